"""The server's hardening, as ASGI middleware and checks made at start-up: uploads bounded in size and
time, Host headers on an allow-list (no DNS rebinding), a Content-Security-Policy and no framing on every
answer, this machine's paths cut out of reasons, and a deadline on request headers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import HTTPException

from simsearch.errors import SimsearchError

log = logging.getLogger("simsearch.serve")
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # form fields and boundaries around an upload


class UploadLimit:
    """ASGI middleware: a POST body over `max_bytes` is refused with 413 as it streams in, before the
    multipart parser has spooled it anywhere; a declared Content-Length over the limit is refused unread;
    a body not received whole within `timeout_s` of the request is answered 408 (a slow client holds no
    connection for long)."""

    def __init__(self, app: Any, max_bytes: int, max_upload_mb: float, timeout_s: float = 30.0):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s
        self.message = f"upload over serve.max_upload_mb={max_upload_mb}"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await self.refuse(send)
        received = 0
        deadline = time.monotonic() + self.timeout_s

        async def counted() -> dict:
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"upload not received within serve.upload_timeout_s={self.timeout_s:g}",
                                    headers={"Connection": "close"}) from None
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self.message)
            return message

        await self.app(scope, counted, send)

    async def refuse(self, send: Any) -> None:
        body = json.dumps({"error": self.message}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


HOST_HEADER = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(?::[0-9]{0,5})?")  # host[:port], IPv6 in brackets


def request_host(headers: list[tuple[bytes, bytes]]) -> str:
    """The host named by the Host header, without its port, lower case ("[::1]" keeps its brackets); the
    whole header as given when it is not exactly host[:port] (never in the allow-list, then)."""
    value = dict(headers).get(b"host", b"").decode("latin-1").strip().lower()
    match = HOST_HEADER.fullmatch(value)
    return match.group(1) if match else value


def allowed_host_names(bound_host: str, extra: list[str]) -> set[str]:
    """The bound host, the loopback names and serve.allowed_hosts, as Host headers spell them."""
    names = {bound_host, "localhost", "127.0.0.1", "::1", *extra}
    names = {f"[{name}]" if ":" in name and not name.startswith("[") else name.lower() for name in names}
    return {name for name in names if HOST_HEADER.fullmatch(name)}


def page_csp(page: str) -> str:
    """A Content-Security-Policy the page satisfies with nothing else allowed: its inline scripts, <style>
    blocks and style attributes by their sha256 (computed from the page as it is at start-up), its
    requests and images from this server only (and the object URL of the image being uploaded)."""

    def hashes(sources: list[str]) -> str:
        digests = {base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() for text in sources}
        return " ".join(f"'sha256-{digest}'" for digest in sorted(digests))

    scripts = re.findall(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", page, re.S | re.I)
    handlers = re.findall(r"\son[a-z]+=\"([^\"]*)\"", page, re.I)
    styles = re.findall(r"<style[^>]*>(.*?)</style>", page, re.S | re.I)
    attributes = re.findall(r"\sstyle=\"([^\"]*)\"", page, re.I)
    script_hashes = ("'unsafe-hashes' " if handlers else "") + hashes(scripts + handlers)  # handlers need it
    style_hashes = ("'unsafe-hashes' " if attributes else "") + hashes(styles + attributes)  # style="" too
    return (f"default-src 'none'; script-src 'self' {script_hashes}; "
            f"style-src 'self' {style_hashes}; img-src 'self' blob: data:; "
            "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


class Guard:
    """ASGI middleware in front of every route: a Host header not in the allow-list is answered 400 (a page
    of another site, DNS-rebound to this address, cannot reach the API through a browser); every response
    gets nosniff, a Content-Security-Policy, no framing and no referrer; absolute paths of this machine
    are cut out of the headers that carry a reason."""

    def __init__(self, app: Any, allowed_hosts: set[str], csp: str, hide: Callable[[str], str]):
        self.app, self.allowed_hosts, self.hide = app, allowed_hosts, hide
        self.headers = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                        (b"referrer-policy", b"no-referrer")]
        self.csp = csp.encode()
        self.docs_csp = b"frame-ancestors 'none'"  # /docs and /redoc load FastAPI's script from a CDN

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = request_host(scope["headers"])
        if host not in self.allowed_hosts:
            log.warning("%s %s -> 400: Host %r is not served", scope["method"], scope["path"], host[:100])
            body = json.dumps({"error": f"the Host header {host[:100]!r} is not served here: add it to "
                                        "serve.allowed_hosts"}).encode()
            await send({"type": "http.response.start", "status": 400, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *self.headers]})
            return await send({"type": "http.response.body", "body": body})
        csp = self.docs_csp if scope["path"] in ("/docs", "/redoc", "/docs/oauth2-redirect") else self.csp

        async def guarded(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(key, self.hide(value.decode("latin-1")).encode("latin-1"))
                           if key.lower() == b"x-simsearch-unavailable" else (key, value)
                           for key, value in message.get("headers", [])]
                message = {**message, "headers": [*headers, *self.headers, (b"content-security-policy", csp)]}
            await send(message)

        await self.app(scope, receive, guarded)


def path_hider(*roots: Path | None) -> Callable[[str], str]:
    """A function cutting this machine's absolute paths out of a text: the store's and the data's folders
    become their names in the config, any other absolute path `<path>`."""
    known = [(str(root.resolve()), name) for root, name in zip(roots, ("data.root", "run.dir")) if root is not None]

    def hide(text: str) -> str:
        for prefix, name in known:
            text = text.replace(prefix, name)
        return re.sub(r"(?<![\w.~<])/[^\s'\"),;]+", "<path>", text)

    return hide


def header_timeout_protocol(timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline on each request's headers (uvicorn has none: a client sending a
    header byte a second would hold its connection for ever): the connection is closed when a request's
    headers are not received whole within `timeout_s` of its first byte (or of the connection)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.arm()

        def arm(self) -> None:
            if self.header_timer is None:
                self.header_timer = self.loop.call_later(timeout_s, self.headers_too_slow)

        def disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:  # a request's first bytes (or more of its headers)
                self.arm()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # headers complete: the body has serve.upload_timeout_s
                self.disarm()

        def on_response_complete(self) -> None:
            self.disarm()  # until the next request's first byte, uvicorn's keep-alive timeout applies
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm()
            super().connection_lost(exc)

        def headers_too_slow(self) -> None:
            self.header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.warning("closing a connection from %s: its request headers took over serve.header_timeout_s=%g",
                            self.client[0] if self.client else "?", timeout_s)
                self.transport.close()

    return HeaderTimeoutProtocol


def check_host(host: str, port: int) -> None:
    """serve.host must name an address of this machine, said before the model is loaded (uvicorn would exit 3)."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as error:
        reason = error.strerror if isinstance(error, socket.gaierror) else str(error)
        raise SimsearchError(f"serve.host={host} cannot be resolved ({reason}): give an address of this "
                             "machine, e.g. serve.host=127.0.0.1") from None


def check_allowed_hosts(allowed_hosts: list[str]) -> None:
    """An entry of serve.allowed_hosts that no Host header can name would be dropped unseen: refused."""
    for name in allowed_hosts:
        spelt = f"[{name}]" if ":" in name and not name.startswith("[") else name.lower()
        if not HOST_HEADER.fullmatch(spelt):
            raise SimsearchError(f"serve.allowed_hosts holds {name!r}, not a host name or address (no port, no "
                                 "spaces): e.g. serve.allowed_hosts=[photos.lan]")
