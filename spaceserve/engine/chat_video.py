"""Video content parts of OpenAI-style chat messages: {"type": "video_url", "video_url": {"url": ...}} and
{"type": "video", "video": <path, bytes or frames>}. Parsing is separate from fetching so the server can apply its
own media policy to the same references: `load_offline_video` is LLM.chat's (the caller owns the machine),
`fetch_video_urls` the server's."""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import unquote, urlparse

from spaceserve.core.errors import InvalidInputError

VIDEO_PART_KINDS = ("video_url", "video")


def video_source_from_part(part: dict[str, Any], kind: str, message_index: int) -> Any:
    """The reference a video part carries: a URL string for video_url, the object itself for video."""
    if kind == "video":
        video = part.get("video")
        if video is None:
            raise InvalidInputError(f"message {message_index}: a video part needs a 'video' value")
        return video
    url = part.get("video_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str):
        raise InvalidInputError(f"message {message_index}: video_url needs a 'url' string")
    return url


def load_offline_video(source: Any) -> Any:
    """A data URL becomes its bytes, a file:// URL or bare path a path string; objects pass through."""
    if not isinstance(source, str):
        return source
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header:
            raise InvalidInputError("video data URLs must be base64-encoded (data:video/mp4;base64,...)")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInputError("video data URL holds invalid base64") from None
    parsed = urlparse(source)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InvalidInputError(f"file URLs must name a local path, got host {parsed.netloc!r}")
        return unquote(parsed.path)
    if parsed.scheme == "":
        return source
    if parsed.scheme in ("http", "https"):
        raise InvalidInputError("http(s) video URLs are not fetched offline; pass bytes, a path or a data URL")
    raise InvalidInputError(f"unsupported video URL scheme {parsed.scheme!r}; use data:, file:// or a path")


def fetch_video_urls(sources: list[Any], media: Any) -> list[bytes]:
    """The server's side: every video reference must be a URL (data:, file://, http(s)://), fetched under `media`
    (a MediaConnector with kind="video"); the error names the video by its position in the prompt."""
    videos = []
    for number, source in enumerate(sources):
        if not isinstance(source, str):
            raise InvalidInputError(
                f"video {number}: send a video as a URL string (video_url with a data:, file:// or http(s):// URL), "
                f"got {type(source).__name__}"
            )
        try:
            data = media.fetch(source)
        except InvalidInputError as exc:
            raise InvalidInputError(f"video {number}: {exc}") from None
        if not data:
            raise InvalidInputError(f"video {number}: the video is empty")
        videos.append(data)
    return videos
