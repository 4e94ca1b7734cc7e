"""OpenAI-style chat messages -> messages for the chat template plus the images they carry, in order."""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import unquote, urlparse

from spaceserve.core.errors import InvalidInputError


def parse_chat_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidInputError("messages must be a non-empty list of {'role', 'content'} dicts")
    template_messages, images = [], []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise InvalidInputError(f"message {index} must be a dict with 'role' and 'content'")
        content = message.get("content")
        if content is None or isinstance(content, str):
            template_messages.append({"role": message["role"], "content": content or ""})
            continue
        if not isinstance(content, list):
            raise InvalidInputError(f"message {index}: content must be a string or a list of parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind in ("image_url", "image", "image_pil"):
                images.append(_image_from_part(part, kind))
                parts.append({"type": "image"})
            else:
                raise InvalidInputError(f"message {index}: unsupported content part {kind!r}")
        template_messages.append({"role": message["role"], "content": parts})
    return template_messages, images


def _image_from_part(part: dict[str, Any], kind: str) -> Any:
    if kind != "image_url":
        return part.get(kind)
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str):
        raise InvalidInputError("image_url needs a 'url' string")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise InvalidInputError("data URLs for images must be base64-encoded")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInputError("image data URL holds invalid base64") from None
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme in ("http", "https"):
        raise InvalidInputError("http(s) image URLs are not fetched offline; pass bytes, a path or a data URL")
    if parsed.scheme == "":
        return url
    raise InvalidInputError(f"unsupported image URL scheme {parsed.scheme!r}")
