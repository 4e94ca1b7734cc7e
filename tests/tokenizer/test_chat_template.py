"""The built-in Qwen2-VL chat template against literal strings the published template produces, and loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from spaceserve.core.errors import ConfigError, InvalidInputError
from spaceserve.tokenizer.chat_template import QWEN2_VL_CHAT_TEMPLATE, ChatTemplate, find_chat_template

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
ASSISTANT = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    return ChatTemplate(QWEN2_VL_CHAT_TEMPLATE)


def test_text_only_message_gets_the_default_system_prompt(template: ChatTemplate) -> None:
    rendered = template.render([{"role": "user", "content": "What is 2+2?"}])
    assert rendered == SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" + ASSISTANT


def test_own_system_message_replaces_the_default(template: ChatTemplate) -> None:
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"}]
    assert template.render(messages) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" + ASSISTANT
    )


def test_image_and_text_parts(template: ChatTemplate) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    expected = SYSTEM + f"<|im_start|>user\n{IMAGE}Describe this image.<|im_end|>\n" + ASSISTANT
    assert template.render(messages) == expected


def test_two_images_in_every_accepted_spelling(template: ChatTemplate) -> None:
    content = [
        {"type": "text", "text": "Compare "},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "text", "text": " and "},
        {"image": "file:///tmp/b.png"},
        {"type": "text", "text": "."},
    ]
    rendered = template.render([{"role": "user", "content": content}], add_generation_prompt=False)
    assert rendered == SYSTEM + f"<|im_start|>user\nCompare {IMAGE} and {IMAGE}.<|im_end|>\n"


def test_multi_turn_conversation_with_video(template: ChatTemplate) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]},
        {"role": "assistant", "content": "A cat jumps."},
        {"role": "user", "content": [{"type": "text", "text": "And then?"}]},
    ]
    assert template.render(messages) == (
        SYSTEM
        + f"<|im_start|>user\n{VIDEO}What happens?<|im_end|>\n"
        + "<|im_start|>assistant\nA cat jumps.<|im_end|>\n"
        + "<|im_start|>user\nAnd then?<|im_end|>\n"
        + ASSISTANT
    )


def test_vision_ids_are_numbered_on_request(template: ChatTemplate) -> None:
    content = [{"type": "image"}, {"type": "video"}, {"type": "image"}]
    rendered = template.render([{"role": "user", "content": content}], add_generation_prompt=False, add_vision_id=True)
    assert rendered == SYSTEM + f"<|im_start|>user\nPicture 1: {IMAGE}Video 1: {VIDEO}Picture 2: {IMAGE}<|im_end|>\n"


def test_message_text_is_not_interpreted_as_jinja(template: ChatTemplate) -> None:
    rendered = template.render([{"role": "user", "content": "{{ 7 * 7 }} {% if x %}"}], add_generation_prompt=False)
    assert rendered == SYSTEM + "<|im_start|>user\n{{ 7 * 7 }} {% if x %}<|im_end|>\n"


@pytest.mark.parametrize(
    "messages,problem",
    [
        ("hello", "non-empty list"),
        ([], "non-empty list"),
        ([{"content": "no role"}], "string 'role'"),
        ([{"role": "user", "content": 5}], "string or a list"),
        ([{"role": "user", "content": ["bare string part"]}], "parts must be objects"),
    ],
)
def test_malformed_messages_are_rejected(template: ChatTemplate, messages: object, problem: str) -> None:
    with pytest.raises(InvalidInputError, match=problem):
        template.render(messages)  # type: ignore[arg-type]


def test_template_errors_and_sandbox_escapes_become_input_errors() -> None:
    raising = ChatTemplate("{{ raise_exception('only user turns, please') }}")
    with pytest.raises(InvalidInputError, match="only user turns"):
        raising.render([{"role": "user", "content": "x"}])
    escaping = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidInputError):
        escaping.render([{"role": "user", "content": "x"}])


def test_tojson_writes_plain_json() -> None:
    rendered = ChatTemplate("{{ messages[0] | tojson }}").render([{"role": "user", "content": "<b> & 'é'"}])
    assert json.loads(rendered) == {"role": "user", "content": "<b> & 'é'"}
    assert "<b>" in rendered and "é" in rendered


def test_syntax_error_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="does not compile"):
        ChatTemplate("{% for x in %}")


def test_template_files_are_found_in_order(tmp_path: Path) -> None:
    assert find_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from tokenizer_config"}))
    assert find_chat_template(tmp_path) == "from tokenizer_config"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from chat_template.json"}))
    assert find_chat_template(tmp_path) == "from chat_template.json"
    (tmp_path / "chat_template.jinja").write_text("from chat_template.jinja")
    assert find_chat_template(tmp_path) == "from chat_template.jinja"


def test_named_templates_in_tokenizer_config_pick_default(tmp_path: Path) -> None:
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert find_chat_template(tmp_path) == "plain"
