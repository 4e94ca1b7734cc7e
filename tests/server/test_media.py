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
from spaceserve.engine.media import MediaBudget
from spaceserve.engine.media_http import MediaPolicy


class _Handler(BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/slow":
            time.sleep(1.0)
        if self.path.startswith("/redirect/"):
            hops = int(self.path.rsplit("/", 1)[1])
            self.send_response(302)
            self.send_header("Location", f"/redirect/{hops - 1}" if hops > 1 else "/image")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/redirect-to/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/redirect-to/") :])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
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


LOOPBACK_ALLOWED = MediaPolicy(allow_private_addresses=True)


def test_http_only_when_enabled_with_cap_and_timeout(http_server):
    base, payload = http_server
    with pytest.raises(InvalidInputError, match="not fetched"):
        MediaConnector().fetch(f"{base}/image")
    assert MediaConnector(allow_http=True, http_policy=LOOPBACK_ALLOWED).fetch(f"{base}/image") == payload
    with pytest.raises(InvalidInputError, match="limit of 1000 bytes"):
        MediaConnector(allow_http=True, max_bytes=1000, http_policy=LOOPBACK_ALLOWED).fetch(f"{base}/image")
    with pytest.raises(InvalidInputError, match="could not be fetched") as refused:
        MediaConnector(allow_http=True, http_policy=LOOPBACK_ALLOWED).fetch(f"{base}/missing")
    assert "404" not in str(refused.value)  # the remote's status is not echoed (a port scanner's oracle)
    with pytest.raises(InvalidInputError, match="timed out"):
        MediaConnector(allow_http=True, timeout_s=0.2, http_policy=LOOPBACK_ALLOWED).fetch(f"{base}/slow")


def test_loopback_private_and_credentialed_urls_are_refused_before_any_connection(http_server):
    base, _ = http_server
    port = base.rsplit(":", 1)[1]
    media = MediaConnector(allow_http=True)
    refused = [
        f"{base}/image",  # 127.0.0.1
        f"http://localhost:{port}/image",
        f"http://2130706433:{port}/image",  # 127.0.0.1 as one decimal number
        f"http://0x7f000001:{port}/image",
        f"http://[::1]:{port}/image",
        f"http://[::ffff:127.0.0.1]:{port}/image",
        "http://10.1.2.3/image",  # refused on its address: nothing is sent
        "http://169.254.169.254/latest/meta-data",
        "http://192.168.0.1/image",
        "http://0.0.0.0/image",
    ]
    for url in refused:
        with pytest.raises(InvalidInputError, match="loopback, private or link-local"):
            media.fetch(url)
    with pytest.raises(InvalidInputError, match="credentials"):
        MediaConnector(allow_http=True, http_policy=LOOPBACK_ALLOWED).fetch(f"http://user:secret@127.0.0.1:{port}/image")
    only_example = MediaConnector(allow_http=True, http_policy=MediaPolicy(allowed_domains=("example.com",)))
    with pytest.raises(InvalidInputError, match="allowed-media-domains"):
        only_example.fetch(f"{base}/image")
    with pytest.raises(InvalidInputError, match="allowed-media-domains"):
        only_example.fetch("http://example.com.evil.test/image")


def test_redirects_are_limited_and_each_target_is_checked(http_server):
    base, payload = http_server
    port = base.rsplit(":", 1)[1]
    allowed = MediaConnector(allow_http=True, http_policy=LOOPBACK_ALLOWED)
    assert allowed.fetch(f"{base}/redirect/2") == payload
    with pytest.raises(InvalidInputError, match="more than 3 times"):
        allowed.fetch(f"{base}/redirect/4")
    # allowed to reach 127.0.0.1 by name, but the redirect leads to localhost, which the list does not admit
    listed = MediaConnector(
        allow_http=True, http_policy=MediaPolicy(allowed_domains=("127.0.0.1",), allow_private_addresses=True)
    )
    with pytest.raises(InvalidInputError, match="allowed-media-domains"):
        listed.fetch(f"{base}/redirect-to/http://localhost:{port}/image")


def test_a_fifo_or_device_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    media = MediaConnector(allowed_local_media_path=str(tmp_path), timeout_s=5)
    started = time.monotonic()
    with pytest.raises(InvalidInputError, match="not a regular file"):
        media.fetch(f"file://{fifo}")
    assert time.monotonic() - started < 2


def test_a_request_budget_counts_bytes_before_reading(tmp_path):
    data = np.random.default_rng(3).bytes(4000)
    (tmp_path / "a.bin").write_bytes(data)
    media = MediaConnector(allowed_local_media_path=str(tmp_path))
    budget = MediaBudget(10_000)
    assert media.fetch(str(tmp_path / "a.bin"), budget) == data
    assert media.fetch(str(tmp_path / "a.bin"), budget) == data
    with pytest.raises(InvalidInputError, match="per request"):
        media.fetch(str(tmp_path / "a.bin"), budget)


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
