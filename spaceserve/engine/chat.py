"""OpenAI-style chat messages -> messages for the chat template plus the images they carry, in order; and the
policy for where those images may come from (MediaConnector), shared by LLM.chat and the server."""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from spaceserve.core.errors import InvalidInputError
from spaceserve.engine.chat_video import VIDEO_PART_KINDS, video_source_from_part

DEFAULT_MAX_MEDIA_BYTES = 20 << 20
DEFAULT_MAX_VIDEO_BYTES = 256 << 20
"""Videos are larger than images: 120 s of 1080p H.264 is tens of MB."""
DEFAULT_MEDIA_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class MediaConnector:
    """Turns a media reference from a message into something `load_image` (or the video probe) takes, under an
    explicit policy. `kind` ("image" or "video") names the media in error messages.

    - data URLs (base64) are always accepted, up to `max_bytes` decoded;
    - local files (file:// URLs or bare paths) only under `allowed_local_media_path` (None: refused), symlinks and
      `..` resolved first;
    - http(s) URLs only when `allow_http`, fetched with `timeout_s` for the whole download and `max_bytes`.
    Objects that are already images (PIL images, arrays, bytes; offline callers only) pass through untouched.
    """

    allowed_local_media_path: str | None = None
    allow_http: bool = False
    max_bytes: int = DEFAULT_MAX_MEDIA_BYTES
    timeout_s: float = DEFAULT_MEDIA_TIMEOUT_S
    kind: str = "image"

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.timeout_s <= 0:
            raise ValueError("MediaConnector needs max_bytes >= 1 and timeout_s > 0")

    @classmethod
    def offline(cls) -> MediaConnector:
        """LLM.chat's policy: the caller owns the machine, so any local path is fine; nothing is fetched."""
        return cls(allowed_local_media_path="/")

    def fetch(self, source: Any) -> Any:
        if not isinstance(source, str):
            return source
        if source.startswith("data:"):
            return self._from_data_url(source)
        parsed = urlparse(source)
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise InvalidInputError(f"file URLs must name a local path, got host {parsed.netloc!r}")
            return self._from_local_file(unquote(parsed.path))
        if parsed.scheme in ("http", "https"):
            return self._from_http(source)
        if parsed.scheme == "":
            return self._from_local_file(source)
        raise InvalidInputError(
            f"unsupported {self.kind} URL scheme {parsed.scheme!r}; use data:, file:// or http(s)://"
        )

    def _from_data_url(self, url: str) -> bytes:
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            example = "data:video/mp4;base64,..." if self.kind == "video" else "data:image/png;base64,..."
            raise InvalidInputError(f"{self.kind} data URLs must be base64-encoded ({example})")
        if len(payload) * 3 // 4 > self.max_bytes:
            raise InvalidInputError(f"{self.kind} data URL holds more than the limit of {self.max_bytes} bytes")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInputError(f"{self.kind} data URL holds invalid base64") from None

    def _from_local_file(self, path: str) -> bytes:
        if self.allowed_local_media_path is None:
            raise InvalidInputError(
                f"local {self.kind} files are not allowed; the server must be started with --allowed-local-media-path "
                f"DIR to read {self.kind}s under DIR"
            )
        resolved = Path(path).expanduser().resolve()
        allowed = Path(self.allowed_local_media_path).expanduser().resolve()
        if not resolved.is_relative_to(allowed):
            raise InvalidInputError(f"{self.kind} file {path} is outside the allowed local media path {allowed}")
        try:
            with open(resolved, "rb") as file:
                data = file.read(self.max_bytes + 1)
        except FileNotFoundError:
            raise InvalidInputError(f"{self.kind} file not found: {path}") from None
        except OSError as exc:
            raise InvalidInputError(f"cannot read {self.kind} file {path}: {exc.strerror or exc}") from None
        if len(data) > self.max_bytes:
            raise InvalidInputError(f"{self.kind} file {path} is larger than the limit of {self.max_bytes} bytes")
        return data

    def _from_http(self, url: str) -> bytes:
        if not self.allow_http:
            raise InvalidInputError(
                f"http(s) {self.kind} URLs are not fetched here; send a data URL, or start the server with "
                "--allow-http-media"
            )
        import httpx

        deadline = time.monotonic() + self.timeout_s
        chunks, size = [], 0
        try:
            with httpx.Client(timeout=self.timeout_s, follow_redirects=True) as client:
                with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise InvalidInputError(f"fetching {self.kind} {url} failed: HTTP {response.status_code}")
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > self.max_bytes:
                        raise InvalidInputError(
                            f"{self.kind} at {url} is larger than the limit of {self.max_bytes} bytes"
                        )
                    for chunk in response.iter_bytes():
                        size += len(chunk)
                        if size > self.max_bytes:
                            raise InvalidInputError(
                                f"{self.kind} at {url} is larger than the limit of {self.max_bytes} bytes"
                            )
                        if time.monotonic() > deadline:
                            raise httpx.ReadTimeout("deadline passed")
                        chunks.append(chunk)
        except httpx.TimeoutException:
            raise InvalidInputError(f"fetching {self.kind} {url} timed out after {self.timeout_s} s") from None
        except httpx.HTTPError as exc:
            raise InvalidInputError(f"fetching {self.kind} {url} failed: {exc}") from None
        return b"".join(chunks)


def parse_chat_messages(
    messages: list[dict[str, Any]],
    media: MediaConnector | None = None,
    max_images: int | None = None,
    videos: list[Any] | None = None,
    max_videos: int | None = None,
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Template messages and the images in order. Image and video references are counted against `max_images` /
    `max_videos` before any is fetched; images are then fetched under `media`'s policy (default:
    MediaConnector.offline()). Video references are appended to `videos` unfetched (video parts are refused when it
    is None): the caller fetches them under its own policy."""
    if not isinstance(messages, list) or not messages:
        raise InvalidInputError("messages must be a non-empty list of {'role', 'content'} dicts")
    template_messages, sources = [], []
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
                sources.append(_image_source(part, kind, index))
                parts.append({"type": "image"})
            elif kind in VIDEO_PART_KINDS and videos is not None:  # the caller collects and fetches videos
                videos.append(video_source_from_part(part, kind, index))
                parts.append({"type": "video"})
            else:
                raise InvalidInputError(f"message {index}: unsupported content part {kind!r}")
        template_messages.append({"role": message["role"], "content": parts})
    if max_images is not None and len(sources) > max_images:
        raise InvalidInputError(f"{len(sources)} images in one prompt exceed limit_mm_per_prompt image={max_images}")
    if max_videos is not None and videos is not None and len(videos) > max_videos:
        raise InvalidInputError(f"{len(videos)} videos in one prompt exceed limit_mm_per_prompt video={max_videos}")
    media = media or MediaConnector.offline()
    images = []
    for number, source in enumerate(sources):
        try:
            images.append(media.fetch(source))
        except InvalidInputError as exc:
            raise InvalidInputError(f"image {number}: {exc}") from None
    return template_messages, images


def _image_source(part: dict[str, Any], kind: str, message_index: int) -> Any:
    if kind != "image_url":
        return part.get(kind)
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str):
        raise InvalidInputError(f"message {message_index}: image_url needs a 'url' string")
    return url
