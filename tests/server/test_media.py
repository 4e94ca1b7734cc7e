"""MediaConnector: where images may come from, with size caps and a timeout on downloads."""

from __future__ import annotations

import base64
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from spaceserve.core.errors import InvalidInputError
from spaceserve.engine.chat import MediaConnector, parse_chat_messages


class _Handler(BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/slow":
            time.sleep(1.0)
        if self.path == "/missing":
            self.send_response(404)
            self.end_headers()
            return
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.payload)))
            self.end_headers()
            self.wfile.write(self.payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout / size cap tests)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_server():
    _Handler.payload = np.random.default_rng(0).bytes(3000)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Handler.payload
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_http_only_when_enabled_with_cap_and_timeout(http_server):
    base, payload = http_server
    with pytest.raises(InvalidInputError, match="not fetched"):
        MediaConnector().fetch(f"{base}/image")
    assert MediaConnector(allow_http=True).fetch(f"{base}/image") == payload
    with pytest.raises(InvalidInputError, match="limit of 1000 bytes"):
        MediaConnector(allow_http=True, max_bytes=1000).fetch(f"{base}/image")
    with pytest.raises(InvalidInputError, match="HTTP 404"):
        MediaConnector(allow_http=True).fetch(f"{base}/missing")
    with pytest.raises(InvalidInputError, match="timed out"):
        MediaConnector(allow_http=True, timeout_s=0.2).fetch(f"{base}/slow")


def test_local_files_only_under_the_allowed_directory(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    secret = tmp_path / "secret.bin"
    data = np.random.default_rng(1).bytes(500)
    secret.write_bytes(data)
    (allowed / "image.bin").write_bytes(data)
    os.symlink(secret, allowed / "link.bin")

    with pytest.raises(InvalidInputError, match="--allowed-local-media-path"):
        MediaConnector().fetch(f"file://{allowed}/image.bin")
    media = MediaConnector(allowed_local_media_path=str(allowed))
    assert media.fetch(f"file://{allowed}/image.bin") == data
    assert media.fetch(str(allowed / "image.bin")) == data
    for escape in (f"file://{secret}", f"file://{allowed}/../secret.bin", str(allowed / "link.bin")):
        with pytest.raises(InvalidInputError, match="outside the allowed"):
            media.fetch(escape)
    with pytest.raises(InvalidInputError, match="not found"):
        media.fetch(f"file://{allowed}/nope.png")
    with pytest.raises(InvalidInputError, match="larger than the limit"):
        MediaConnector(allowed_local_media_path=str(allowed), max_bytes=100).fetch(str(allowed / "image.bin"))
    assert MediaConnector.offline().fetch(str(secret)) == data  # LLM.chat: the caller's own machine


def test_data_urls_and_other_schemes():
    data = np.random.default_rng(2).bytes(300)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert MediaConnector().fetch(url) == data
    with pytest.raises(InvalidInputError, match="limit of 100 bytes"):
        MediaConnector(max_bytes=100).fetch(url)
    with pytest.raises(InvalidInputError, match="base64-encoded"):
        MediaConnector().fetch("data:image/png,rawbytes")
    with pytest.raises(InvalidInputError, match="scheme 'ftp'"):
        MediaConnector().fetch("ftp://host/image.png")


def test_image_count_is_checked_before_anything_is_fetched():
    fetched = []

    class Recording(MediaConnector):
        def fetch(self, source):
            fetched.append(source)
            return source

    part = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    with pytest.raises(InvalidInputError, match="limit_mm_per_prompt image=2"):
        parse_chat_messages([{"role": "user", "content": [part] * 3}], Recording(), max_images=2)
    assert fetched == []
    messages, images = parse_chat_messages([{"role": "user", "content": [part] * 2}], Recording(), max_images=2)
    assert len(images) == 2 and len(fetched) == 2 and messages[0]["content"] == [{"type": "image"}] * 2
