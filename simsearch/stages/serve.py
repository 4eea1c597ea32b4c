"""A JSON search API and a small web page over any store (FastAPI, run by uvicorn).

At start-up the store is checked against its manifest, the index loaded (or built) and the model of
the manifest loaded and warmed up, so the first request is as fast as the hundredth. Searches by item
need no model call; uploads are embedded in batches across concurrent requests, off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import hashlib
import io
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from omegaconf import DictConfig
from PIL import Image
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException

from simsearch.drawing import placeholder_image
from simsearch.errors import SimsearchError
from simsearch.index import open_searcher
from simsearch.items import ItemImages
from simsearch.pixels import UnreadableImage, decode_image, open_image, open_inside, to_rgb
from simsearch.stages.search import Query as SearchQuery
from simsearch.stages.search import SearchResult, answer, item_query, query_encoder
from simsearch.store import Store

log = logging.getLogger("simsearch.serve")
WEB = Path(__file__).parent.parent / "web"
PAGE = WEB / "index.html"
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}  # the page's own files
MAX_SUGGESTIONS = 100  # ids one GET /items answers at most
THUMBNAIL_CACHE_ITEMS = 512  # thumbnails kept in memory (a few tens of KB each)
THUMBNAIL_DECODES = 2  # large images decoded at once: 8 requests for a 9000 px image wait their turn
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # form fields and boundaries around an upload
FILTER_HELP = "only items this keeps, e.g. category == 'dress' and price < 50 (docs/recommendation.md)"


class AnyPathConvertor(Convertor):
    """Item ids are relative paths, which may hold any character, newlines included."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anypath", AnyPathConvertor())


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


class UploadBatcher:
    """Embeds uploaded images together: requests queue their image, one worker thread runs the model
    on up to `batch_size` of them at a time, and each request awaits its own row."""

    def __init__(self, encoder: Any, batch_size: int, wait_ms: float):
        self.encoder, self.batch_size, self.wait_s = encoder, batch_size, wait_ms / 1000
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()

    async def embed(self, image: Image.Image) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((image, future))
        return await future

    async def _run(self) -> None:
        while True:
            pending = [await self.queue.get()]
            deadline = time.perf_counter() + self.wait_s
            while len(pending) < self.batch_size and (left := deadline - time.perf_counter()) > 0:
                try:
                    pending.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            try:
                vectors = await asyncio.to_thread(self.encoder.encode, [image for image, _ in pending])
                for (_, future), vector in zip(pending, vectors):
                    if not future.done():
                        future.set_result(vector)
            except Exception as error:  # a model failure answers every waiting request, and serving goes on
                log.exception("embedding a batch of %d uploads failed", len(pending))
                for _, future in pending:
                    if not future.done():
                        future.set_exception(error)


def result_json(store: Store, result: SearchResult) -> dict[str, Any]:
    results = [{**{k: v for k, v in asdict(n).items() if k != "row"}, "image": f"/items/{quote(n.id, safe='')}/image"}
               for n in result.neighbours]
    body: dict[str, Any] = {"query": result.query, "results": results}
    if not results:
        body["note"] = "no item matches the filter"
    if result.precision is not None:
        body["precision"] = result.precision
    return body


def thumbnail_bytes(image: Image.Image, size_px: int) -> bytes:
    image = image.copy()
    if max(image.size) < min(64, size_px):  # tiny dataset images (28, 32 px) are enlarged so they can be seen
        scale = 64 // max(image.size) + 1
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.thumbnail((size_px, size_px))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def file_thumbnail(path: Path, size_px: int, real_root: Path) -> Image.Image:
    """A file reduced to at most size_px per side while it is decoded (JPEG draft mode, Pillow's reducing
    gap), so a 9000 x 9000 photo never sits in memory in full as RGB copies; EXIF rotation honoured. Opened
    once and checked after opening (`open_inside`): a link swapped since the root check is not read."""
    from PIL import ImageOps

    with open_inside(path, real_root) as handle:
        try:
            with open_image(handle) as image:
                image.thumbnail((size_px, size_px), reducing_gap=2.0)
                return to_rgb(ImageOps.exif_transpose(image))
        except (ValueError, OSError, Image.DecompressionBombError):  # modes thumbnail cannot reduce: the full decoder
            handle.seek(0)
            return decode_image(handle)


class ThumbnailCache:
    """PNG thumbnails of the store's items, made once each and kept (least recently used out).

    At most THUMBNAIL_DECODES images are decoded at a time, and concurrent requests for one item wait
    for its first decoding instead of decoding it again: 8 requests for a 9000 x 9000 photo decode it
    once. Failures (a moved file) are not cached: the file may come back.
    """

    def __init__(self, images: ItemImages, size_px: int):
        self.images, self.size_px = images, size_px
        self.cache: OrderedDict[int, bytes] = OrderedDict()
        self.lock = threading.Lock()
        self.decoding = threading.BoundedSemaphore(THUMBNAIL_DECODES)
        self.row_locks: dict[int, threading.Lock] = {}

    def cached(self, row: int) -> bytes | None:
        with self.lock:
            if row in self.cache:
                self.cache.move_to_end(row)
                return self.cache[row]
            return None

    def png(self, row: int) -> bytes:
        if (found := self.cached(row)) is not None:
            return found
        with self.lock:
            row_lock = self.row_locks.setdefault(row, threading.Lock())
        with row_lock:
            if (found := self.cached(row)) is not None:  # made while this request waited
                return found
            with self.decoding:
                data = thumbnail_bytes(self.decode(row), self.size_px)
            with self.lock:
                self.cache[row] = data
                while len(self.cache) > THUMBNAIL_CACHE_ITEMS:
                    self.cache.popitem(last=False)
                self.row_locks.pop(row, None)
        return data

    def decode(self, row: int) -> Image.Image:
        path = self.images.path_of(row)
        if path is None:
            return self.images.image(row)
        if not path.is_file():
            raise UnreadableImage(f"{self.images.store.items[row]['path']} was moved or deleted since extraction")
        return file_thumbnail(path, self.size_px, self.images.root)


def create_app(cfg: DictConfig) -> FastAPI:
    """The FastAPI app for the store in cfg.run.dir; everything heavy happens once, here."""
    store = Store.open(cfg.run.dir, verify=True)
    searcher = open_searcher(store, cfg.index, cfg.run.seed)
    encoder = query_encoder(store, cfg.serve.device)
    encoder.encode([Image.new("RGB", (encoder.image_size_px, encoder.image_size_px))])  # warm-up
    searcher.search(store.vectors(np.array([0])), min(10, len(store)))
    images = ItemImages(store)
    batcher = UploadBatcher(encoder, cfg.serve.batch_size, cfg.serve.batch_wait_ms)
    max_bytes = int(cfg.serve.max_upload_mb * 1024 * 1024)
    max_k = min(cfg.serve.max_k, len(store) - 1)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    # no absolute path of this machine in the OpenAPI document or any answer
    app = FastAPI(title="simsearch", description=f"Image similarity search over the store {store.dir.name}",
                  lifespan=lifespan)
    app.state.batcher = batcher
    app.add_middleware(UploadLimit, max_bytes=max_bytes + MULTIPART_OVERHEAD_BYTES, max_upload_mb=cfg.serve.max_upload_mb,
                       timeout_s=cfg.serve.upload_timeout_s)
    data_root = store.manifest.get("data", {}).get("root")
    hide = path_hider(Path(data_root) if data_root else None, store.dir)
    allowed_hosts = allowed_host_names(cfg.serve.host, list(cfg.serve.allowed_hosts))
    if cfg.serve.host in ("0.0.0.0", "::"):
        log.warning("serving on every address: requests must name a host in serve.allowed_hosts (now %s)",
                    sorted(allowed_hosts))
    app.add_middleware(Guard, allowed_hosts=allowed_hosts, csp=page_csp(PAGE.read_text(encoding="utf-8")), hide=hide)
    thumbnails = ThumbnailCache(images, cfg.serve.thumbnail_px)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and Starlette's own (bad multipart, no route)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, error.status_code, error.detail)
        detail = hide(error.detail) if isinstance(error.detail, str) else error.detail
        return JSONResponse({"error": detail}, status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(SimsearchError)  # a query that cannot be answered (a blank upload): its sentence
    async def refused(request: Request, error: SimsearchError) -> JSONResponse:
        log.warning("%s %s -> 400: %s", request.method, request.url.path, error)
        return JSONResponse({"error": hide(str(error))}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in error.errors())
        log.warning("%s %s -> 422: %s", request.method, request.url.path, problems)
        return JSONResponse({"error": problems}, status_code=422)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"error": "internal error: see the server's log"}, status_code=500)

    def checked_k(k: int) -> int:
        if not 1 <= k <= max_k:
            raise HTTPException(422, f"k={k} is out of range: 1..{max_k}")
        return k

    def row_of(item_id: str) -> int:
        try:
            return store.row_of(item_id)
        except SimsearchError:
            raise HTTPException(404, f"no item {item_id!r} in this store") from None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(404, f"no file {name!r} here")
        return Response((WEB / name).read_bytes(), media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    sorted_ids: list[str] = []
    sorted_ids_lock = threading.Lock()

    @app.get("/items")
    def item_ids(prefix: str = "", limit: int = Query(20, ge=1, le=MAX_SUGGESTIONS)) -> dict[str, Any]:
        """Item ids starting with `prefix`, in sorted order (the page suggests them as one types)."""
        with sorted_ids_lock:  # sorted once, on the first call: a store's items are read only when asked for
            if not sorted_ids:
                sorted_ids.extend(sorted(str(item["id"]) for item in store.items))
        start = bisect.bisect_left(sorted_ids, prefix)
        ids = []
        for item_id in sorted_ids[start:start + limit + 1]:
            if not item_id.startswith(prefix):
                break
            ids.append(item_id)
        return {"prefix": prefix, "ids": ids[:limit], "more": len(ids) > limit}

    @app.get("/health")
    def health() -> dict[str, Any]:
        manifest = store.manifest
        return {"status": "ok", "items": len(store), "dim": store.dim, "model": manifest["model"].get("name"),
                "weights": manifest.get("weights"), "checkpoint": manifest["model"].get("checkpoint"),
                "image_size": manifest.get("image_size"), "index": searcher.description, "device": encoder.device,
                "labelled": store.has_labels, "max_k": max_k, "filter_columns": {"label": "str", **store.metadata_columns}}

    @app.get("/items/{item_id:anypath}/image", responses={200: {"content": {"image/png": {}}}})
    def item_image(item_id: str) -> Response:
        """The item's thumbnail; a file moved or deleted since extraction gets a placeholder tile with
        the reason (header X-Simsearch-Unavailable), so a result list is never broken."""
        row = row_of(item_id)
        try:
            return Response(thumbnails.png(row), media_type="image/png", headers={"Cache-Control": "max-age=3600"})
        except SimsearchError as error:  # a path that leaves the data root
            raise HTTPException(403, str(error)) from None
        except (UnreadableImage, OSError) as error:
            reason = str(error)
        tile = thumbnail_bytes(placeholder_image(reason, min(cfg.serve.thumbnail_px, 256)), cfg.serve.thumbnail_px)
        header = reason.encode("ascii", "backslashreplace").decode()[:300].replace("\n", " ")
        return Response(tile, media_type="image/png", headers={"Cache-Control": "no-store",
                                                               "X-Simsearch-Unavailable": header})

    @app.get("/items/{item_id:anypath}")
    def item(item_id: str) -> dict[str, Any]:
        row = row_of(item_id)
        return {**store.items[row], "row": row, "label": store.label_name(row),
                "image": f"/items/{quote(str(store.items[row]['id']), safe='')}/image",
                **({"metadata": store.metadata[row]} if store.metadata_columns else {})}

    @app.get("/search")
    def search_by_item(item: str = Query(..., description="an item id or row"), k: int = 10,
                       filter: str | None = Query(None, description=FILTER_HELP)) -> dict[str, Any]:  # noqa: A002
        return result_json(store, answer(store, searcher, item_query(store, row_of(item)), checked_k(k), lambda: encoder,
                                         filter))

    @app.post("/search")
    async def search_by_upload(request: Request, file: UploadFile = File(...), k: int = Form(10),
                               filter: str | None = Form(None, description=FILTER_HELP)) -> dict[str, Any]:  # noqa: A002
        k = checked_k(k)
        store.filter_rows(filter)  # a bad filter is a 400 before the upload is embedded
        declared = int(request.headers.get("content-length") or 0)
        if declared > max_bytes + 64 * 1024:
            raise HTTPException(413, f"upload over serve.max_upload_mb={cfg.serve.max_upload_mb}")
        data = await file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"upload over serve.max_upload_mb={cfg.serve.max_upload_mb}")
        if not data:
            raise HTTPException(400, "the uploaded file is empty")
        try:
            image = await asyncio.to_thread(decode_image, io.BytesIO(data))
        except UnreadableImage as error:
            raise HTTPException(400, f"the upload is not a readable image: {error}") from None
        vector = await batcher.embed(image)
        query = SearchQuery("vector", file.filename or "upload", vector=vector)
        result = await asyncio.to_thread(answer, store, searcher, query, k, lambda: encoder, filter)
        result.query = {"file": query.caption}
        return result_json(store, result)

    return app


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


def server_config(app: FastAPI, cfg: DictConfig, log_level: str = "info") -> Any:
    """The uvicorn configuration of `simsearch serve` (tests start the same one)."""
    import uvicorn

    return uvicorn.Config(app, host=cfg.serve.host, port=cfg.serve.port, log_level=log_level,
                          http=header_timeout_protocol(cfg.serve.header_timeout_s))


def check_host(host: str, port: int) -> None:
    """serve.host must name an address of this machine, said before the model is loaded (uvicorn would exit 3)."""
    import socket

    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as error:
        reason = error.strerror if isinstance(error, socket.gaierror) else str(error)
        raise SimsearchError(f"serve.host={host} cannot be resolved ({reason}): give an address of this "
                             "machine, e.g. serve.host=127.0.0.1") from None


def serve(cfg: DictConfig) -> None:
    """`simsearch serve`: the app on cfg.serve.host:port (127.0.0.1 unless told otherwise)."""
    import uvicorn

    check_host(cfg.serve.host, cfg.serve.port)
    for name in cfg.serve.allowed_hosts:  # one that no Host header can name would be dropped unseen
        spelt = f"[{name}]" if ":" in name and not name.startswith("[") else name.lower()
        if not HOST_HEADER.fullmatch(spelt):
            raise SimsearchError(f"serve.allowed_hosts holds {name!r}, not a host name or address (no port, no "
                                 "spaces): e.g. serve.allowed_hosts=[photos.lan]")
    app = create_app(cfg)
    if cfg.serve.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: reachable from other machines; simsearch has no authentication", cfg.serve.host)
    print(f"simsearch: serving {cfg.run.dir} on http://{cfg.serve.host}:{cfg.serve.port}/ (API docs: /docs)")
    server = uvicorn.Server(server_config(app, cfg))
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind
        pass
    if not server.started:  # uvicorn logged why (the port taken, an address not of this machine)
        raise SimsearchError(f"cannot serve on {cfg.serve.host}:{cfg.serve.port} (see the error above): "
                             "choose another serve.port or serve.host")
