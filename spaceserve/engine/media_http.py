"""Fetching http(s) media for the server without becoming a proxy into its network (SSRF).

Every URL, the first and each redirect target, is checked before anything is sent: http or https, no credentials,
a host the allow-list admits, and a host whose every resolved address is public (loopback, private, link-local,
multicast, reserved and unspecified addresses are refused unless the server allows them). Numeric host forms
(2130706433, 0x7f000001, 0177.0.0.1) resolve like any name, so they are checked as the address they denote. The
connection then goes to the address that was checked (the name is kept for the Host header and TLS), so a name
that resolves differently a moment later (DNS rebinding) reaches nothing new. Everything runs on the event loop
(name resolution in a thread of its own), so stalled fetches hold no shared thread pool.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit, urlunsplit

from spaceserve.core.errors import InvalidInputError

T = TypeVar("T")
_REDIRECTS = {301, 302, 303, 307, 308}
_CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class MediaPolicy:
    allowed_domains: tuple[str, ...] | None = None
    """Hosts media may come from (a name admits itself and its subdomains; an IP literal admits that address).
    None: any host that passes the address check."""
    allow_private_addresses: bool = False
    max_redirects: int = 3

    def __post_init__(self) -> None:
        if self.max_redirects < 0:
            raise ValueError("max_redirects must be >= 0")
        if self.allowed_domains is not None:
            object.__setattr__(
                self, "allowed_domains", tuple(d.strip().lower().rstrip(".") for d in self.allowed_domains if d.strip())
            )

    def admits_host(self, host: str) -> bool:
        if self.allowed_domains is None:
            return True
        host = host.lower().rstrip(".")
        return any(host == domain or host.endswith("." + domain) for domain in self.allowed_domains)


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global
    )


async def run_in_own_thread(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run blocking `fn` in a thread of its own and wait at most `timeout_s`. A call that hangs (a stalled resolver,
    a hung file system) leaves only its own thread behind: no pool shared with other requests fills up."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def work() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop closed meanwhile: nobody waits for this
            pass

    threading.Thread(target=work, name="spaceserve-media", daemon=True).start()
    try:
        return await asyncio.wait_for(future, timeout_s)
    except asyncio.TimeoutError:
        raise InvalidInputError(f"{what} timed out after {timeout_s:g} s") from None


@dataclass(frozen=True)
class _Target:
    url: str  # with the checked address as its host
    host_header: str
    server_name: str


async def _check_url(url: str, policy: MediaPolicy, kind: str, deadline: float) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidInputError(f"{kind} URL is malformed") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidInputError(f"{kind} URL scheme {parts.scheme!r} is not fetched; use http(s)")
    if parts.username is not None or parts.password is not None:
        raise InvalidInputError(f"{kind} URLs with credentials (user:password@host) are refused")
    host = parts.hostname
    if not host:
        raise InvalidInputError(f"{kind} URL has no host")
    if not policy.admits_host(host):
        raise InvalidInputError(f"{kind} host {host!r} is not in the server's --allowed-media-domains")
    port = port or (443 if parts.scheme == "https" else 80)
    addresses = await _resolve(host, port, kind, deadline)
    if not policy.allow_private_addresses:
        for address in addresses:
            if not is_public_address(address):
                raise InvalidInputError(
                    f"{kind} host {host!r} resolves to a loopback, private or link-local address; the server does "
                    "not fetch from those (--allow-private-media-addresses allows it)"
                )
    address = addresses[0]
    literal = f"[{address}]" if address.version == 6 else str(address)
    default_port = port == (443 if parts.scheme == "https" else 80)
    netloc = literal if default_port else f"{literal}:{port}"
    host_header = host if default_port else f"{host}:{port}"
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    return _Target(pinned, host_header, host)


async def _resolve(host: str, port: int, kind: str, deadline: float) -> list[Any]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass

    def lookup() -> list[Any]:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))

    try:
        addresses = await run_in_own_thread(lookup, max(0.0, deadline - time.monotonic()), f"resolving {kind} host")
    except OSError:
        raise InvalidInputError(f"{kind} host {host!r} could not be resolved") from None
    if not addresses:
        raise InvalidInputError(f"{kind} host {host!r} could not be resolved")
    return addresses


async def fetch_http(
    url: str, *, policy: MediaPolicy, max_bytes: int, timeout_s: float, kind: str, reserve: Callable[[int], None]
) -> bytes:
    """GET `url` under `policy`, at most `max_bytes`, within `timeout_s` in all (redirects and resolution
    included). `reserve(n)` is called before each n bytes are kept (the request's media budget); it raises to stop.
    Failures raise InvalidInputError saying what went wrong without the remote's details."""
    import httpx

    deadline = time.monotonic() + timeout_s
    try:
        return await asyncio.wait_for(
            _fetch(httpx, url, policy, max_bytes, kind, reserve, deadline), max(0.0, deadline - time.monotonic())
        )
    except asyncio.TimeoutError:
        raise InvalidInputError(f"fetching the {kind} URL timed out after {timeout_s:g} s") from None


async def _fetch(httpx: Any, url: str, policy: MediaPolicy, max_bytes: int, kind: str, reserve, deadline: float) -> bytes:
    timeout = httpx.Timeout(max(0.01, deadline - time.monotonic()))
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(policy.max_redirects + 1):
            target = await _check_url(url, policy, kind, deadline)
            headers = {"Host": target.host_header, "Accept": "*/*", "Accept-Encoding": "identity"}
            try:
                async with client.stream(
                    "GET", target.url, headers=headers, extensions={"sni_hostname": target.server_name}
                ) as response:
                    if response.status_code in _REDIRECTS:
                        location = response.headers.get("location")
                        if not location:
                            raise InvalidInputError(f"the {kind} URL redirected without a location")
                        url = urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise InvalidInputError(f"the {kind} URL could not be fetched (the remote refused it)")
                    return await _read_body(response, max_bytes, kind, reserve)
            except httpx.TimeoutException:
                raise InvalidInputError(f"fetching the {kind} URL timed out") from None
            except httpx.HTTPError:
                raise InvalidInputError(f"the {kind} URL could not be fetched") from None
    raise InvalidInputError(f"the {kind} URL redirected more than {policy.max_redirects} times")


async def _read_body(response: Any, max_bytes: int, kind: str, reserve: Callable[[int], None]) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise InvalidInputError(f"{kind} at the URL is larger than the limit of {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in response.aiter_raw(_CHUNK_BYTES):
        size += len(chunk)
        if size > max_bytes:
            raise InvalidInputError(f"{kind} at the URL is larger than the limit of {max_bytes} bytes")
        reserve(len(chunk))
        chunks.append(chunk)
    return b"".join(chunks)
