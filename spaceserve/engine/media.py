"""Where a chat message's media may come from (MediaConnector), shared by LLM.chat and the server, and what one
request may bring in all (MediaBudget).

The server fetches with `fetch_async`: http(s) on the event loop, local files and data-URL decoding each in a
thread of its own with a deadline, so a stalled source (a FIFO, a hung mount, a slow remote) delays only the request
that waits on it. Bytes are counted against the request's budget before they are read: a file by its size, a data
URL by its decoded length, a download chunk by chunk.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from spaceserve.core.errors import InvalidInputError
from spaceserve.engine.media_http import MediaPolicy, fetch_http, run_in_own_thread

DEFAULT_MAX_MEDIA_BYTES = 20 << 20
DEFAULT_MAX_VIDEO_BYTES = 256 << 20
"""Videos are larger than images: 120 s of 1080p H.264 is tens of MB."""
DEFAULT_MAX_REQUEST_MEDIA_BYTES = 256 << 20
DEFAULT_MEDIA_TIMEOUT_S = 10.0


class MediaBudget:
    """The media bytes one request may still bring in; `reserve` raises once they run out."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0

    def reserve(self, num_bytes: int) -> None:
        self.used += num_bytes
        if self.used > self.max_bytes:
            raise InvalidInputError(
                f"the request's media exceed the server's limit of {self.max_bytes} bytes per request"
            )


@dataclass(frozen=True)
class MediaConnector:
    """Turns a media reference from a message into bytes under an explicit policy. `kind` ("image" or "video")
    names the media in error messages.

    - data URLs (base64) are always accepted, up to `max_bytes` decoded;
    - local files (file:// URLs or bare paths) only under `allowed_local_media_path` (None: refused), symlinks and
      `..` resolved first, and only regular files (a FIFO or device would block or never end);
    - http(s) URLs only when `allow_http`, under `http_policy` (media_http.py), `timeout_s` for the whole download.
    Objects that are already images (PIL images, arrays, bytes; offline callers only) pass through untouched.
    """

    allowed_local_media_path: str | None = None
    allow_http: bool = False
    max_bytes: int = DEFAULT_MAX_MEDIA_BYTES
    timeout_s: float = DEFAULT_MEDIA_TIMEOUT_S
    kind: str = "image"
    http_policy: MediaPolicy = field(default_factory=MediaPolicy)

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.timeout_s <= 0:
            raise ValueError("MediaConnector needs max_bytes >= 1 and timeout_s > 0")

    @classmethod
    def offline(cls) -> MediaConnector:
        """LLM.chat's policy: the caller owns the machine, so any local path is fine; nothing is fetched."""
        return cls(allowed_local_media_path="/")

    def fetch(self, source: Any, budget: MediaBudget | None = None) -> Any:
        """Blocking form of fetch_async, for callers without an event loop (LLM.chat, tools)."""
        if not isinstance(source, str):
            return source
        budget = budget or MediaBudget(self.max_bytes)
        kind, where = self._classify(source)
        if kind == "data":
            return self._data_bytes(where, budget)
        if kind == "file":
            return self._read(self._open_checked(where, budget), where)
        return asyncio.run(self._from_http(where, budget))

    async def fetch_async(self, source: Any, budget: MediaBudget | None = None) -> Any:
        if not isinstance(source, str):
            return source
        budget = budget or MediaBudget(self.max_bytes)
        kind, where = self._classify(source)
        if kind == "data":
            if len(where) < 1 << 16:
                return self._data_bytes(where, budget)
            return await run_in_own_thread(
                lambda: self._data_bytes(where, budget), self.timeout_s, f"decoding the {self.kind} data URL"
            )
        if kind == "file":
            descriptor = self._open_checked(where, budget)
            return await run_in_own_thread(
                lambda: self._read(descriptor, where), self.timeout_s, f"reading {self.kind} file {where}"
            )
        return await self._from_http(where, budget)

    def _classify(self, source: str) -> tuple[str, str]:
        """("data", url) | ("file", path) | ("http", url), or InvalidInputError for what this policy refuses."""
        if source.startswith("data:"):
            return "data", source
        parsed = urlparse(source)
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise InvalidInputError(f"file URLs must name a local path, got host {parsed.netloc!r}")
            return "file", unquote(parsed.path)
        if parsed.scheme in ("http", "https"):
            if not self.allow_http:
                raise InvalidInputError(
                    f"http(s) {self.kind} URLs are not fetched here; send a data URL, or start the server with "
                    "--allow-http-media"
                )
            return "http", source
        if parsed.scheme == "":
            return "file", source
        raise InvalidInputError(
            f"unsupported {self.kind} URL scheme {parsed.scheme!r}; use data:, file:// or http(s)://"
        )

    async def _from_http(self, url: str, budget: MediaBudget) -> bytes:
        return await fetch_http(
            url, policy=self.http_policy, max_bytes=self.max_bytes, timeout_s=self.timeout_s, kind=self.kind,
            reserve=budget.reserve,
        )

    def _data_bytes(self, url: str, budget: MediaBudget) -> bytes:
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            example = "data:video/mp4;base64,..." if self.kind == "video" else "data:image/png;base64,..."
            raise InvalidInputError(f"{self.kind} data URLs must be base64-encoded ({example})")
        decoded_size = len(payload) * 3 // 4
        if decoded_size > self.max_bytes:
            raise InvalidInputError(f"{self.kind} data URL holds more than the limit of {self.max_bytes} bytes")
        budget.reserve(decoded_size)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInputError(f"{self.kind} data URL holds invalid base64") from None

    def _open_checked(self, path: str, budget: MediaBudget) -> int:
        """Check the path against the policy and open it without blocking (opening a FIFO waits for a writer):
        only a regular file within the size limits is kept open, and its size is taken from the budget."""
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
            descriptor = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except FileNotFoundError:
            raise InvalidInputError(f"{self.kind} file not found: {path}") from None
        except OSError as exc:
            raise InvalidInputError(f"cannot read {self.kind} file {path}: {exc.strerror or exc}") from None
        try:
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInputError(f"{self.kind} file {path} is not a regular file")
            if info.st_size > self.max_bytes:
                raise InvalidInputError(f"{self.kind} file {path} is larger than the limit of {self.max_bytes} bytes")
            budget.reserve(info.st_size)
            os.set_blocking(descriptor, True)
        except BaseException:
            os.close(descriptor)
            raise
        return descriptor

    def _read(self, descriptor: int, path: str) -> bytes:
        """Read an opened file and close it (a file that grew past the limit since it was opened is refused)."""
        try:
            with os.fdopen(descriptor, "rb") as file:
                data = file.read(self.max_bytes + 1)
        except OSError as exc:
            raise InvalidInputError(f"cannot read {self.kind} file {path}: {exc.strerror or exc}") from None
        if len(data) > self.max_bytes:
            raise InvalidInputError(f"{self.kind} file {path} is larger than the limit of {self.max_bytes} bytes")
        return data
