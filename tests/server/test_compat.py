"""What users moving over from vLLM expect of the API, over real HTTP with the openai client: logprobs (chat and
completions, plain and streamed, equal to the offline engine's), n > 1, batched completion prompts,
system_fingerprint, --chat-template."""

from __future__ import annotations

import math

import httpx
import numpy as np

from spaceserve import SamplingParams
from spaceserve.server.app import create_app
from spaceserve.server.args import ServerArgs
from tests.server.conftest import SERVED_NAME, ThreadedServer


def _reference(live_server, prompt, **params):
    return live_server.reference.generate(prompt, SamplingParams(**params), use_tqdm=False)[0]


def test_completion_logprobs_equal_the_offline_engine(live_server):
    client = live_server.client()
    reply = client.completions.create(model=SERVED_NAME, prompt="logprob check", max_tokens=6, temperature=0, logprobs=3)
    expected = _reference(live_server, "logprob check", temperature=0.0, max_tokens=6, logprobs=3).outputs[0]
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    for step, (token_id, value, top) in enumerate(zip(expected.token_ids, logprobs.token_logprobs, logprobs.top_logprobs)):
        reference = expected.logprobs[step]
        assert math.isclose(value, reference[token_id].logprob, rel_tol=1e-4, abs_tol=1e-4)
        assert reference[token_id].rank == 1  # greedy: the sampled token is the most likely one
        assert 1 <= len(top) <= 3 and max(top.values()) == value  # keyed by text: byte pieces may collide
        values = [lp.logprob for lp in reference.values()]
        assert all(v <= 0 for v in values) and sum(math.exp(v) for v in values) <= 1 + 1e-5
    assert logprobs.text_offset == sorted(logprobs.text_offset)


def test_chat_logprobs_plain_and_streamed_agree(live_server):
    client = live_server.client()
    kwargs = dict(
        model=SERVED_NAME, messages=[{"role": "user", "content": "stream logprobs"}], max_tokens=8, temperature=0,
        logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True},
    )
    plain = client.chat.completions.create(**kwargs)
    content = plain.choices[0].logprobs.content
    assert len(content) == plain.usage.completion_tokens == 8
    assert all(len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == entry.logprob for entry in content)
    assert all(entry.bytes == list(entry.token.encode()) for entry in content)
    streamed = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices and c.choices[0].logprobs]
    streamed_content = [entry for c in streamed for entry in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed_content] == [(e.token, round(e.logprob, 5)) for e in content]


def test_n_samples_equal_the_offline_fan_out(live_server):
    client = live_server.client()
    reply = client.completions.create(model=SERVED_NAME, prompt="three ways", max_tokens=6, temperature=1.0, seed=11, n=3)
    expected = _reference(live_server, "three ways", temperature=1.0, max_tokens=6, seed=11, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.text for c in reply.choices] == [o.text for o in expected.outputs]
    assert len({c.text for c in reply.choices}) > 1  # seed + i: the samples differ
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert reply.usage.completion_tokens == sum(len(o.token_ids) for o in expected.outputs)

    chat = client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "two"}], max_tokens=5, n=2, seed=3, temperature=1.0
    )
    assert [c.index for c in chat.choices] == [0, 1] and chat.system_fingerprint.startswith("fp_spaceserve_")
    chunks = list(client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "two"}], max_tokens=5, n=2, seed=3, temperature=1.0,
        stream=True, stream_options={"include_usage": True},
    ))
    texts = {0: "", 1: ""}
    finals = []
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finals.append(choice.index)
    assert sorted(finals) == [0, 1] and texts == {c.index: c.message.content for c in chat.choices}
    assert chunks[-1].usage == chat.usage
    live_server.assert_idle_and_clean()


def test_batched_completion_prompts(live_server):
    rng = np.random.default_rng(9)
    ids = [int(t) for t in rng.integers(0, 250, size=7)]
    prompts = ["first prompt", "the second one"]
    client = live_server.client()
    reply = client.completions.create(model=SERVED_NAME, prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    for prompt_index, prompt in enumerate(prompts):
        expected = _reference(live_server, prompt, temperature=0.0, max_tokens=5)
        assert [c.text for c in reply.choices[2 * prompt_index : 2 * prompt_index + 2]] == [expected.outputs[0].text] * 2
    by_ids = client.completions.create(model=SERVED_NAME, prompt=[ids, ids[:4]], max_tokens=3, temperature=0)
    assert by_ids.usage.prompt_tokens == 7 + 4 and len(by_ids.choices) == 2
    streamed = list(client.completions.create(model=SERVED_NAME, prompt=prompts, max_tokens=5, temperature=0, stream=True))
    joined = {0: "", 1: ""}
    for chunk in streamed:
        for choice in chunk.choices:
            joined[choice.index] += choice.text
    assert joined == {0: reply.choices[0].text, 1: reply.choices[2].text}
    assert len({c.system_fingerprint for c in streamed} | {reply.system_fingerprint}) == 1


def test_a_chat_template_given_to_the_server_is_used(live_server, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    path = tmp_path / "template.jinja"
    path.write_text(template)
    for value in (str(path), template):
        args = ServerArgs(served_model_name=SERVED_NAME, chat_template=value)
        server = ThreadedServer(create_app(live_server.engine, args), args)
        try:
            body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
            reply = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30).json()
        finally:
            server.stop()
        rendered = "[user] hello\n[assistant] "
        assert reply["usage"]["prompt_tokens"] == len(live_server.engine.tokenizer.encode(rendered))
