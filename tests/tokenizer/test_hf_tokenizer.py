"""HFTokenizer on the tiny tokenizer.json, checked against the tokenizers library and transformers' AutoTokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import tokenizers

from spaceserve.core.errors import ConfigError
from spaceserve.models.config import ModelConfig
from spaceserve.tokenizer import ByteLevelTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from spaceserve.tokenizer.byte_level import QWEN_SPECIAL_TOKENS
from tests.tiny_checkpoints import preset_config
from tests.tiny_tokenizer import TINY_VOCAB_SIZE, write_tiny_tokenizer

transformers = pytest.importorskip("transformers")

MIXED_TEXT = (
    "<|im_start|>user\nDescribe <|vision_start|><|image_pad|><|vision_end|> héllo, 你好 🙂 the cat!<|im_end|>\n"
)
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is in the picture?"}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
        {"role": "assistant", "content": "No."},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Why?"}]},
    ],
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path) -> HFTokenizer:
    return HFTokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def reference(tiny_dir: Path):  # transformers' tokenizer for the same files
    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


def random_text(rng: random.Random, length: int) -> str:
    alphabet = "abcdefghij the cat é ñ ü 你好世界 🙂🚀 .,!?\n\t" + "".join(QWEN_SPECIAL_TOKENS[:3])
    return "".join(rng.choice(alphabet) for _ in range(length))


def test_tiny_tokenizer_layout(tiny_dir: Path) -> None:
    raw = tokenizers.Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    assert raw.get_vocab_size(with_added_tokens=True) <= TINY_VOCAB_SIZE
    assert sorted(raw.get_vocab(with_added_tokens=True).values()) == list(range(raw.get_vocab_size()))
    for offset, token in enumerate(QWEN_SPECIAL_TOKENS):
        assert raw.token_to_id(token) == 256 + offset
    assert raw.encode("<|image_pad|>", add_special_tokens=False).ids == [268]
    assert raw.encode("A\x00\xff", add_special_tokens=False).ids == [65, 0, 195, 191]  # byte id == byte value
    assert any(token_id >= 270 for token_id in raw.encode("Describe this image", add_special_tokens=False).ids)


def test_tokenizers_library_and_autotokenizer_agree(tiny_dir: Path, reference) -> None:
    raw = tokenizers.Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    rng = random.Random(0)
    for text in [MIXED_TEXT, *(random_text(rng, 40) for _ in range(20))]:
        expected = raw.encode(text, add_special_tokens=False).ids
        assert reference.encode(text, add_special_tokens=False) == expected
        assert reference.encode(text) == expected  # Qwen adds no BOS
    assert reference("<|image_pad|>")["input_ids"] == [268]
    assert reference.eos_token_id == 258


def test_encode_decode_match_transformers(tokenizer: HFTokenizer, reference) -> None:
    rng = random.Random(1)
    for text in [MIXED_TEXT, *(random_text(rng, 60) for _ in range(20))]:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_special_token_properties(tokenizer: HFTokenizer) -> None:
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.eos_token_id == 258
    assert tokenizer.all_special_ids == tuple(range(256, 270))
    assert tokenizer.vocab_size == TINY_VOCAB_SIZE
    assert tokenizer.token_to_id("<|video_pad|>") == 269
    assert tokenizer.token_to_id("<|no_such_token|>") is None
    assert tokenizer.decode([257, 104, 105, 258]) == "hi"


def test_chat_template_matches_transformers(tokenizer: HFTokenizer, reference) -> None:
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            expected = reference.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert tokenizer.apply_chat_template(messages, add_generation_prompt) == expected
    prompt = tokenizer.apply_chat_template(CONVERSATIONS[1])
    assert tokenizer.encode(prompt).count(268) == 2 and tokenizer.encode(prompt).count(269) == 1


def test_incremental_detokenizer_streams_whole_characters(tokenizer: HFTokenizer) -> None:
    rng = random.Random(2)
    for _ in range(20):
        text = random_text(rng, 50)
        detokenizer = tokenizer.new_detokenizer(skip_special_tokens=False)
        pieces = [detokenizer.step(token_id) for token_id in tokenizer.encode(text)]
        assert "".join(pieces) == detokenizer.text == text
        assert "\ufffd" not in detokenizer.text
    # 你 is three byte tokens: nothing comes out until the last one.
    detokenizer = tokenizer.new_detokenizer()
    assert [detokenizer.step(token_id) for token_id in "你".encode()] == ["", "", "你"]
    assert detokenizer.step(258) == ""  # special tokens are skipped by default


def test_stream_plus_finish_equals_decode_on_random_ids(tokenizer: HFTokenizer) -> None:
    """Random ids include broken UTF-8 (lone continuation bytes, truncated characters) between specials."""
    rng = random.Random(3)
    for _ in range(200):
        ids = [rng.choice([rng.randrange(TINY_VOCAB_SIZE), rng.randrange(128, 256)]) for _ in range(12)]
        for skip in (True, False):
            detokenizer = tokenizer.new_detokenizer(skip)
            streamed = "".join(detokenizer.step(token_id) for token_id in ids) + detokenizer.finish()
            assert streamed == detokenizer.text == tokenizer.decode(ids, skip_special_tokens=skip)
    detokenizer = tokenizer.new_detokenizer()
    assert [detokenizer.step(token_id) for token_id in b"ok\xe4\xbd"] == ["o", "k", "", ""]
    assert detokenizer.finish() == "\ufffd" and detokenizer.text == "ok\ufffd"


def test_eos_falls_back_to_the_model_config_and_template_to_the_builtin(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "chat_template.jinja").unlink()
    tokenizer = HFTokenizer.from_dir(tmp_path, default_eos_token_id=258)
    assert tokenizer.eos_token_id == 258
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]).startswith("<|im_start|>system\n")
    with pytest.raises(ConfigError, match="eos"):
        HFTokenizer.from_dir(tmp_path)


def test_unknown_eos_token_is_a_config_error(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    with pytest.raises(ConfigError, match="not in the vocabulary"):
        HFTokenizer.from_dir(tmp_path)


def test_load_tokenizer_picks_by_the_presence_of_tokenizer_json(tiny_dir: Path, tmp_path: Path) -> None:
    config = ModelConfig.from_hf_dict(preset_config("qwen2_vl"))
    assert isinstance(load_tokenizer(tiny_dir, config), HFTokenizer)
    assert isinstance(load_tokenizer(tmp_path, config), ByteLevelTokenizer)
    fallback = load_tokenizer(None, config)
    assert isinstance(fallback, ByteLevelTokenizer)
    hf = load_tokenizer(tiny_dir, config)
    for token in QWEN_SPECIAL_TOKENS:  # the fallback's special ids are the tiny tokenizer's
        assert fallback.token_to_id(token) == hf.token_to_id(token)
