"""Server settings (what `spaceserve serve` adds to the engine's flags). Each field's metadata is its flag: the
CLI is generated from this dataclass (engine/arg_utils.py `add_dataclass_args`), so a default is written once."""

from __future__ import annotations

from dataclasses import dataclass, replace

from spaceserve.engine.cli_fields import cli_field, parse_csv
from spaceserve.engine.media import (
    DEFAULT_MAX_MEDIA_BYTES,
    DEFAULT_MAX_REQUEST_MEDIA_BYTES,
    DEFAULT_MAX_VIDEO_BYTES,
    DEFAULT_MEDIA_TIMEOUT_S,
    MediaConnector,
)
from spaceserve.engine.media_http import MediaPolicy

API_KEY_ENV = "SPACESERVE_API_KEY"
DEFAULT_MAX_REQUEST_BODY_BYTES = 64 << 20


@dataclass(frozen=True)
class ServerArgs:
    host: str = cli_field("127.0.0.1", "address to listen on")
    port: int = cli_field(8000, "port to listen on")
    served_model_name: tuple[str, ...] | None = cli_field(
        None, "the names clients may put in `model`; the first is reported in responses (default: MODEL)", nargs="+"
    )
    api_key: tuple[str, ...] | None = cli_field(
        None, f"require `Authorization: Bearer KEY` on every /v1 route; several keys may be given (default: "
        f"${API_KEY_ENV}, else no key)", nargs="+",
    )
    chat_template: str | None = cli_field(
        None, "a chat template (a file, or the Jinja text itself) used instead of the model directory's"
    )
    disable_log_requests: bool = cli_field(False, "do not log each request's id, endpoint and sampling settings")
    allowed_local_media_path: str | None = cli_field(
        None, "serve file:// images and videos under this directory (default: local files refused)"
    )
    allow_http_media: bool = cli_field(False, "fetch http(s) image and video URLs (default: refused)")
    allowed_media_domains: tuple[str, ...] | None = cli_field(
        None, "with --allow-http-media: fetch only from these hosts (a name matches itself and its subdomains; "
        "default: any public host)", type=parse_csv, nargs=None,
    )
    allow_private_media_addresses: bool = cli_field(
        False, "with --allow-http-media: also fetch from loopback, private and link-local addresses (default: "
        "refused, whatever the host name resolves to)"
    )
    media_max_redirects: int = cli_field(3, "http media: redirects followed, each re-checked like the first URL")
    media_max_bytes: int = cli_field(DEFAULT_MAX_MEDIA_BYTES, "bytes per image, whatever its source")
    media_max_video_bytes: int = cli_field(DEFAULT_MAX_VIDEO_BYTES, "bytes per video, whatever its source")
    media_max_request_bytes: int = cli_field(
        DEFAULT_MAX_REQUEST_MEDIA_BYTES, "media bytes one request may bring in all (counted before each read; a "
        "reference repeated in a request is fetched once)"
    )
    media_timeout_s: float = cli_field(DEFAULT_MEDIA_TIMEOUT_S, "seconds one media fetch may take, whole download")
    max_request_body_bytes: int = cli_field(DEFAULT_MAX_REQUEST_BODY_BYTES, "largest request body accepted (413 above)")
    header_timeout_s: float = cli_field(10.0, "seconds a client has to send its request headers")
    body_timeout_s: float = cli_field(30.0, "seconds a client has to send its whole request body (408 after)")
    uvicorn_log_level: str = cli_field("info", "uvicorn's log level")

    def __post_init__(self) -> None:
        for name in ("served_model_name", "api_key", "allowed_media_domains"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif value is not None:
                object.__setattr__(self, name, tuple(value))
        if self.api_key is not None and not all(self.api_key):
            raise ValueError("an API key must not be empty")

    def model_names(self, model: str) -> tuple[str, ...]:
        return self.served_model_name or (model,)

    def media_policy(self) -> MediaPolicy:
        return MediaPolicy(
            allowed_domains=self.allowed_media_domains,
            allow_private_addresses=self.allow_private_media_addresses,
            max_redirects=self.media_max_redirects,
        )

    def media_connector(self) -> MediaConnector:
        return MediaConnector(
            allowed_local_media_path=self.allowed_local_media_path,
            allow_http=self.allow_http_media,
            max_bytes=self.media_max_bytes,
            timeout_s=self.media_timeout_s,
            http_policy=self.media_policy(),
        )

    def video_connector(self) -> MediaConnector:
        return replace(self.media_connector(), max_bytes=self.media_max_video_bytes, kind="video")
