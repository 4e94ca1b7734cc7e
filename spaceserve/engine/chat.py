"""OpenAI-style chat messages -> messages for the chat template plus the media references they carry, in order.
Parsing never fetches: `parse_chat_content` gives the references (counted against the per-prompt limits first), and
the caller fetches them under its own MediaConnector policy (engine/media.py): `parse_chat_messages` does so at once
for LLM.chat, the server asynchronously."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from spaceserve.core.errors import InvalidInputError
from spaceserve.engine.chat_video import VIDEO_PART_KINDS, video_source_from_part
from spaceserve.engine.media import MediaConnector

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
"""The roles OpenAI's chat API defines ("function" is its deprecated name for "tool")."""


@dataclass
class ParsedChat:
    messages: list[dict[str, Any]]
    """For the chat template: text parts, and {"type": "image"} / {"type": "video"} where media go."""
    image_sources: list[Any] = field(default_factory=list)
    video_sources: list[Any] = field(default_factory=list)


def parse_chat_content(
    messages: list[dict[str, Any]],
    max_images: int | None = None,
    max_videos: int | None = None,
    allow_videos: bool = True,
) -> ParsedChat:
    """Template messages and the media references in order, nothing fetched. Image and video references are
    counted against `max_images` / `max_videos` here, before anything is read."""
    if not isinstance(messages, list) or not messages:
        raise InvalidInputError("messages must be a non-empty list of {'role', 'content'} dicts")
    parsed = ParsedChat([])
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise InvalidInputError(f"message {index} must be a dict with 'role' and 'content'")
        role = message["role"]
        if role == "function":
            role = "tool"
        if role not in CHAT_ROLES:
            raise InvalidInputError(f"message {index}: unknown role {role!r}; use one of {', '.join(CHAT_ROLES)}")
        content = message.get("content")
        if content is None or isinstance(content, str):
            parsed.messages.append({"role": role, "content": content or ""})
            continue
        if not isinstance(content, list):
            raise InvalidInputError(f"message {index}: content must be a string or a list of parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text", "")
                if not isinstance(text, str):
                    raise InvalidInputError(f"message {index}: a text part's 'text' must be a string")
                parts.append({"type": "text", "text": text})
            elif kind in ("image_url", "image", "image_pil"):
                parsed.image_sources.append(_image_source(part, kind, index))
                parts.append({"type": "image"})
            elif kind in VIDEO_PART_KINDS and allow_videos:
                parsed.video_sources.append(video_source_from_part(part, kind, index))
                parts.append({"type": "video"})
            else:
                raise InvalidInputError(f"message {index}: unsupported content part {kind!r}")
        parsed.messages.append({"role": role, "content": parts})
    if max_images is not None and len(parsed.image_sources) > max_images:
        raise InvalidInputError(
            f"{len(parsed.image_sources)} images in one prompt exceed limit_mm_per_prompt image={max_images}"
        )
    if max_videos is not None and len(parsed.video_sources) > max_videos:
        raise InvalidInputError(
            f"{len(parsed.video_sources)} videos in one prompt exceed limit_mm_per_prompt video={max_videos}"
        )
    return parsed


def parse_chat_messages(
    messages: list[dict[str, Any]],
    media: MediaConnector | None = None,
    max_images: int | None = None,
    videos: list[Any] | None = None,
    max_videos: int | None = None,
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Template messages and the images in order, fetched at once under `media`'s policy (default:
    MediaConnector.offline()). Video references are appended to `videos` unfetched (video parts are refused when it
    is None): the caller fetches them under its own policy."""
    parsed = parse_chat_content(messages, max_images, max_videos, allow_videos=videos is not None)
    if videos is not None:
        videos.extend(parsed.video_sources)
    media = media or MediaConnector.offline()
    images = []
    for number, source in enumerate(parsed.image_sources):
        try:
            images.append(media.fetch(source))
        except InvalidInputError as exc:
            raise InvalidInputError(f"image {number}: {exc}") from None
    return parsed.messages, images


def _image_source(part: dict[str, Any], kind: str, message_index: int) -> Any:
    if kind != "image_url":
        return part.get(kind)
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str):
        raise InvalidInputError(f"message {message_index}: image_url needs a 'url' string")
    return url
