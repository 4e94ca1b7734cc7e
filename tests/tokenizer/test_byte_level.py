"""ByteLevelTokenizer: UTF-8 bytes plus Qwen's special tokens at the ids the model config gives."""

from __future__ import annotations

import json
import random
from dataclasses import fields

import pytest

from spaceserve.core.errors import ConfigError, InvalidInputError
from spaceserve.models.config import ModelConfig
from spaceserve.tokenizer import ByteLevelTokenizer, SpecialTokenIds, Tokenizer
from spaceserve.tokenizer.byte_level import QWEN_SPECIAL_TOKENS
from tests.tiny_checkpoints import PRESETS, preset_config


@pytest.fixture(scope="module")
def tokenizer() -> ByteLevelTokenizer:
    config = ModelConfig.from_hf_dict(preset_config("qwen2_vl"))
    return ByteLevelTokenizer(SpecialTokenIds.from_model_config(config), config.text.vocab_size)


def special_ids(ids: range | list[int]) -> SpecialTokenIds:
    return SpecialTokenIds(**{field.name: token_id for field, token_id in zip(fields(SpecialTokenIds), ids)})


def random_text(rng: random.Random, length: int) -> str:
    alphabet = "ab c\n é ñ 你好 🙂 " + "".join(QWEN_SPECIAL_TOKENS)
    return "".join(rng.choice(alphabet) for _ in range(length))


def test_special_ids_of_the_real_qwen2_vl_config() -> None:
    raw = json.loads((PRESETS / "Qwen2-VL-2B-Instruct" / "config.json").read_text())
    ids = SpecialTokenIds.from_model_config(ModelConfig.from_hf_dict(raw))
    assert ids.by_token() == {token: 151643 + offset for offset, token in enumerate(QWEN_SPECIAL_TOKENS)}
    assert ids.vision_pad == raw["vision_token_id"]


def test_special_ids_of_the_tiny_config(tokenizer: ByteLevelTokenizer) -> None:
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.all_special_ids == tuple(range(256, 270))
    assert tokenizer.eos_token_id == 258
    assert tokenizer.vocab_size == 320
    assert tokenizer.token_to_id("<|image_pad|>") == 268
    assert tokenizer.token_to_id("a") == 97
    assert tokenizer.token_to_id("é") is None


def test_encode_maps_bytes_and_special_tokens(tokenizer: ByteLevelTokenizer) -> None:
    assert tokenizer.encode("<|im_start|>hé<|image_pad|>") == [257, 104, 0xC3, 0xA9, 268]
    assert tokenizer.encode("<|im_start") == list(b"<|im_start")  # an incomplete special is plain text


def test_round_trip_on_random_text(tokenizer: ByteLevelTokenizer) -> None:
    rng = random.Random(0)
    for _ in range(50):
        text = random_text(rng, 40)
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
        without_specials = text
        for token in QWEN_SPECIAL_TOKENS:
            without_specials = without_specials.replace(token, "")
        assert tokenizer.decode(ids) == without_specials


def test_ids_beyond_bytes_and_specials_decode_as_id_mod_256(tokenizer: ByteLevelTokenizer) -> None:
    assert tokenizer.decode([256 + 14 + 34, 512 + 104, 105]) == "0hi"  # 304 % 256 = 48 = "0"
    assert tokenizer.decode([0xC3]) == "\ufffd"  # an incomplete character at the end


def test_incremental_detokenizer_joins_split_characters(tokenizer: ByteLevelTokenizer) -> None:
    rng = random.Random(1)
    for _ in range(30):
        text = random_text(rng, 30)
        detokenizer = tokenizer.new_detokenizer(skip_special_tokens=False)
        pieces = [detokenizer.step(token_id) for token_id in tokenizer.encode(text)]
        assert "".join(pieces) == detokenizer.text == text
    detokenizer = tokenizer.new_detokenizer()
    assert [detokenizer.step(token_id) for token_id in "🙂".encode()] == ["", "", "", "🙂"]


def test_finish_flushes_an_incomplete_character(tokenizer: ByteLevelTokenizer) -> None:
    detokenizer = tokenizer.new_detokenizer()
    assert [detokenizer.step(token_id) for token_id in b"ok\xe4\xbd"] == ["o", "k", "", ""]
    assert detokenizer.finish() == "\ufffd" and detokenizer.text == "ok\ufffd"
    assert detokenizer.finish() == ""


def test_skipped_special_inside_a_character_is_invisible(tokenizer: ByteLevelTokenizer) -> None:
    skipping = tokenizer.new_detokenizer(skip_special_tokens=True)
    assert [skipping.step(token_id) for token_id in (0xC3, 258, 0xA9)] == ["", "", "é"]
    keeping = tokenizer.new_detokenizer(skip_special_tokens=False)
    assert [keeping.step(token_id) for token_id in (0xC3, 258, 0xA9)] == ["", "\ufffd<|im_end|>", "\ufffd"]


def test_chat_prompt_uses_the_builtin_template(tokenizer: ByteLevelTokenizer) -> None:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"text": "Hi"}]}])
    assert prompt.endswith("<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.encode(prompt).count(268) == 1


def test_rejects_special_ids_that_collide_with_bytes_or_exceed_the_vocab() -> None:
    with pytest.raises(ConfigError, match="must lie in"):
        ByteLevelTokenizer(special_ids(range(200, 214)), vocab_size=320)
    with pytest.raises(ConfigError, match="must lie in"):
        ByteLevelTokenizer(special_ids(range(256, 270)), vocab_size=269)
    with pytest.raises(ConfigError, match="distinct"):
        ByteLevelTokenizer(special_ids([*range(256, 269), 268]), vocab_size=320)


def test_text_that_is_not_unicode_is_rejected(tokenizer: ByteLevelTokenizer) -> None:
    with pytest.raises(InvalidInputError, match="not valid Unicode"):
        tokenizer.encode("lone surrogate \ud800")
