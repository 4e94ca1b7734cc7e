"""The offline API on the tiny preset: shapes of outputs, sampling controls, chat, and the CLI."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from spaceserve import SamplingParams
from tests.llm_factory import TEST_KV_CACHE_BYTES, make_llm
from spaceserve.cli import main

PAD = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def llm():
    return make_llm("tiny-qwen2-vl", max_model_len=512)


def image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (50, 70, 3), dtype=np.uint8)


def test_outputs_come_back_in_prompt_order_with_text_and_ids(llm):
    prompts = ["first " * 5, {"prompt": "second " + PAD, "multi_modal_data": {"image": image()}}, "third"]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    assert [o.prompt for o in outputs] == ["first " * 5, "second " + PAD, "third"]
    for output in outputs:
        assert len(output.outputs[0].token_ids) == 6 and output.outputs[0].finish_reason == "length"
        assert output.outputs[0].text == llm.get_tokenizer().decode(output.outputs[0].token_ids)


def test_seeded_sampling_is_reproducible_in_any_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate("seeded prompt", params)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True)
    batch = llm.generate(["other one", "seeded prompt", "another"], [others, params, others])
    assert batch[1].outputs[0].token_ids == alone
    greedy = llm.generate("seeded prompt", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert alone != greedy[0].outputs[0].token_ids


def test_stop_token_ids_and_stop_strings(llm):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    reference = llm.generate("stop here", greedy)[0].outputs[0]
    stop_id = reference.token_ids[4]
    first = reference.token_ids.index(stop_id)
    stopped = llm.generate("stop here", SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]))[0]
    assert stopped.outputs[0].token_ids == reference.token_ids[: first + 1]
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason == stop_id

    text = reference.text
    stop = next(text[i : i + 2] for i in range(3, len(text) - 2) if text[i : i + 2].isprintable() and text[i : i + 2].strip())
    by_string = llm.generate("stop here", SamplingParams(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True))[0]
    assert by_string.outputs[0].text == text[: text.index(stop)]
    assert by_string.outputs[0].finish_reason == "stop" and by_string.outputs[0].stop_reason == stop


def test_chat_accepts_openai_style_image_parts(llm):
    buffer = io.BytesIO()
    Image.fromarray(image(3)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}]}]
    chat = llm.chat(messages, params)[0]
    template = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}], True
    )
    direct = llm.generate({"prompt": template, "multi_modal_data": {"image": buffer.getvalue()}}, params)[0]
    assert chat.outputs[0].token_ids == direct.outputs[0].token_ids
    assert chat.prompt_token_ids.count(268) == len(chat.prompt_token_ids) - len(llm.get_tokenizer().encode(template)) + 1


def test_cli_generate_prints_the_greedy_answer(llm, tmp_path, capsys):
    path = tmp_path / "picture.png"
    Image.fromarray(image(5)).save(path)
    args = ["generate", "tiny-qwen2-vl", "--image", str(path), "--prompt", "Describe", "--max-tokens", "4"]
    assert main(args + ["--kv-cache-memory-bytes", str(TEST_KV_CACHE_BYTES)]) == 0
    printed = capsys.readouterr().out
    messages = [{"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "Describe"}]}]
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=4, seed=0))[0].outputs[0].text
    assert printed == expected + "\n"


def test_cli_reports_bad_input_without_a_traceback(capsys):
    args = ["generate", "tiny-qwen2-vl", "--image", "/no/such.png", "--prompt", "x"]
    assert main(args + ["--kv-cache-memory-bytes", str(TEST_KV_CACHE_BYTES)]) == 2
    assert "such.png" in capsys.readouterr().err
