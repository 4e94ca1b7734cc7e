"""Server settings (what `spaceserve serve` adds to the engine's flags)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from spaceserve.engine.chat import (
    DEFAULT_MAX_MEDIA_BYTES,
    DEFAULT_MAX_VIDEO_BYTES,
    DEFAULT_MEDIA_TIMEOUT_S,
    MediaConnector,
)


@dataclass(frozen=True)
class ServerArgs:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    """The name clients put in `model`; default: the model argument."""
    allowed_local_media_path: str | None = None
    allow_http_media: bool = False
    media_max_bytes: int = DEFAULT_MAX_MEDIA_BYTES
    media_timeout_s: float = DEFAULT_MEDIA_TIMEOUT_S
    media_max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES
    """Videos' own byte cap (every other rule of the media policy is shared with images)."""
    uvicorn_log_level: str = "info"

    def media_connector(self) -> MediaConnector:
        return MediaConnector(
            allowed_local_media_path=self.allowed_local_media_path,
            allow_http=self.allow_http_media,
            max_bytes=self.media_max_bytes,
            timeout_s=self.media_timeout_s,
        )

    def video_connector(self) -> MediaConnector:
        return replace(self.media_connector(), max_bytes=self.media_max_video_bytes, kind="video")
