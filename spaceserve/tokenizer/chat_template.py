"""Chat templates: the built-in Qwen2-VL one, finding a model's own, rendering like transformers does."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from spaceserve.core.errors import ConfigError, InvalidInputError

# Renders the same text as the template published with Qwen2-VL-*-Instruct: a default system prompt unless the
# conversation starts with one, ChatML turns, and one vision placeholder per image/video part (optionally
# numbered with add_vision_id). Every literal is an expression, so whitespace in this source never leaks out.
QWEN2_VL_CHAT_TEMPLATE = r"""
{%- set counts = namespace(images=0, videos=0) -%}
{%- for message in messages -%}
    {%- if loop.first and message['role'] != 'system' -%}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
    {%- endif -%}
    {{- '<|im_start|>' ~ message['role'] ~ '\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- elif message['content'] is not none -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}
                {%- set counts.images = counts.images + 1 -%}
                {%- if add_vision_id -%}{{- 'Picture ' ~ counts.images ~ ': ' -}}{%- endif -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif part['type'] == 'video' or 'video' in part -%}
                {%- set counts.videos = counts.videos + 1 -%}
                {%- if add_vision_id -%}{{- 'Video ' ~ counts.videos ~ ': ' -}}{%- endif -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif 'text' in part -%}
                {{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""


RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "add_generation_prompt", "chat_template"})
"""The template call's own arguments; chat_template_kwargs naming one of them is refused."""


def check_template_kwargs(kwargs: Any) -> dict[str, Any]:
    """A request's chat_template_kwargs: a dict of variable names, none of them the call's own arguments."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise InvalidInputError("chat_template_kwargs must be an object whose keys are variable names")
    reserved = sorted(set(kwargs) & RESERVED_TEMPLATE_VARIABLES)
    if reserved:
        raise InvalidInputError(f"chat_template_kwargs may not set {', '.join(reserved)}: the request sets those itself")
    return dict(kwargs)


class ChatTemplate:
    """A compiled chat template, rendered in a sandbox configured as transformers configures its own."""

    def __init__(self, source: str) -> None:
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"chat template does not compile: {exc}") from None
        self.source = source

    @classmethod
    def from_file_or_text(cls, value: str) -> ChatTemplate:
        """`--chat-template`: a path to a template file, or the template text itself (as vLLM takes it)."""
        path = Path(value).expanduser()
        looks_like_template = any(marker in value for marker in ("{{", "{%", "\n"))
        if not looks_like_template:
            try:
                return cls(path.read_text(encoding="utf-8"))
            except OSError as exc:
                raise ConfigError(f"cannot read the chat template file {value}: {exc.strerror or exc}") from None
        return cls(value)

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        _check_messages(messages)
        check_template_kwargs(variables)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except RecursionError:
            raise InvalidInputError("chat template rejected the messages: they nest too deeply") from None
        except Exception as exc:  # noqa: BLE001 - any failure of a template on this input is the input's problem
            raise InvalidInputError(f"chat template rejected the messages: {type(exc).__name__}: {exc}") from None


def find_chat_template(model_dir: str | os.PathLike[str]) -> str | None:
    """The model's own template: chat_template.jinja, chat_template.json, then tokenizer_config.json."""
    directory = Path(model_dir)
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file():
            try:
                settings = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} is not valid JSON: {exc}") from None
            template = _template_from_json(settings.get("chat_template"))
            if template is not None:
                return template
    return None


def _template_from_json(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # several named templates: [{"name": ..., "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return None


def _check_messages(messages: Any) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidInputError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InvalidInputError(f"message {index} must be an object with a string 'role'")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list, tuple)):
            raise InvalidInputError(f"message {index} content must be a string or a list of parts")
        if isinstance(content, (list, tuple)) and not all(isinstance(part, Mapping) for part in content):
            raise InvalidInputError(f"message {index} content parts must be objects")


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # jinja2's own tojson HTML-escapes; chat templates (and transformers) expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)
