"""The JSON search API and the web page over a store (FastAPI): the routes. Everything heavy (the store
checked, the index opened, the model loaded and warmed up) happens once, in `create_app`."""

from __future__ import annotations

import asyncio
import bisect
import io
import logging
import threading
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
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
from simsearch.pixels import UnreadableImage, decode_image
from simsearch.query import Query as SearchQuery
from simsearch.query import SearchResult, answer, item_query, query_encoder
from simsearch.selection import select
from simsearch.server.batching import UploadBatcher
from simsearch.server.hardening import (
    MULTIPART_OVERHEAD_BYTES,
    Guard,
    UploadLimit,
    allowed_host_names,
    header_timeout_protocol,
    page_csp,
    path_hider,
)
from simsearch.server.thumbnails import ThumbnailCache, thumbnail_bytes
from simsearch.store import Store

log = logging.getLogger("simsearch.serve")
WEB = Path(__file__).parent.parent / "web"
PAGE = WEB / "index.html"
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}  # the page's own files
MAX_SUGGESTIONS = 100  # ids one GET /items answers at most
FILTER_HELP = "only items this keeps, e.g. category == 'dress' and price < 50 (docs/recommendation.md)"


class AnyPathConvertor(Convertor):
    """Item ids are relative paths, which may hold any character, newlines included."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anypath", AnyPathConvertor())


def result_json(store: Store, result: SearchResult) -> dict[str, Any]:
    results = [{**{k: v for k, v in asdict(n).items() if k != "row"}, "image": f"/items/{quote(n.id, safe='')}/image"}
               for n in result.neighbours]
    body: dict[str, Any] = {"query": result.query, "results": results}
    if not results:
        body["note"] = "no item matches the filter"
    if result.precision is not None:
        body["precision"] = result.precision
    return body


@dataclass
class Served:
    """What the routes read: the store and its searcher and encoder, opened once at start-up."""

    cfg: DictConfig
    store: Store
    searcher: Any
    encoder: Any
    thumbnails: ThumbnailCache
    batcher: UploadBatcher
    max_k: int
    max_bytes: int

    def checked_k(self, k: int) -> int:
        if not 1 <= k <= self.max_k:
            raise HTTPException(422, f"k={k} is out of range: 1..{self.max_k}")
        return k

    def row_of(self, item_id: str) -> int:
        try:
            return self.store.row_of(item_id)
        except SimsearchError:
            raise HTTPException(404, f"no item {item_id!r} in this store") from None


def open_served(cfg: DictConfig) -> Served:
    """The store checked against its manifest, its index opened (or built), the model loaded and warmed up."""
    store = Store.open(cfg.run.dir, verify=True)
    searcher = open_searcher(store, cfg.index, cfg.run.seed)
    encoder = query_encoder(store, cfg.serve.device)
    encoder.encode([Image.new("RGB", (encoder.image_size_px, encoder.image_size_px))])  # warm-up
    searcher.search(store.vectors(np.array([0])), min(10, len(store)))
    return Served(cfg, store, searcher, encoder, ThumbnailCache(ItemImages(store), cfg.serve.thumbnail_px),
                  UploadBatcher(encoder, cfg.serve.batch_size, cfg.serve.batch_wait_ms),
                  min(cfg.serve.max_k, len(store) - 1), int(cfg.serve.max_upload_mb * 1024 * 1024))


def create_app(cfg: DictConfig) -> FastAPI:
    """The FastAPI app for the store in cfg.run.dir; everything heavy happens once, here."""
    served = open_served(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        served.batcher.start()
        yield
        await served.batcher.stop()

    # no absolute path of this machine in the OpenAPI document or any answer
    app = FastAPI(title="simsearch", description=f"Image similarity search over the store {served.store.dir.name}",
                  lifespan=lifespan)
    app.state.batcher = served.batcher
    hide = add_hardening(app, served)
    add_error_handlers(app, hide)
    add_page_routes(app)
    add_item_routes(app, served)
    add_search_routes(app, served)
    return app


def add_hardening(app: FastAPI, served: Served) -> Any:
    """The middleware in front of every route (`simsearch.server.hardening`); returns the path hider."""
    cfg = served.cfg
    app.add_middleware(UploadLimit, max_bytes=served.max_bytes + MULTIPART_OVERHEAD_BYTES,
                       max_upload_mb=cfg.serve.max_upload_mb, timeout_s=cfg.serve.upload_timeout_s)
    data_root = served.store.manifest.get("data", {}).get("root")
    hide = path_hider(Path(data_root) if data_root else None, served.store.dir)
    allowed_hosts = allowed_host_names(cfg.serve.host, list(cfg.serve.allowed_hosts))
    if cfg.serve.host in ("0.0.0.0", "::"):
        log.warning("serving on every address: requests must name a host in serve.allowed_hosts (now %s)",
                    sorted(allowed_hosts))
    app.add_middleware(Guard, allowed_hosts=allowed_hosts, csp=page_csp(PAGE.read_text(encoding="utf-8")), hide=hide)
    return hide


def add_error_handlers(app: FastAPI, hide: Any) -> None:
    """Every refusal as `{"error": sentence}` with this machine's paths cut out; a failure as a 500 with no detail."""

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


def add_page_routes(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:  # the page names no icon (`data:,`); other clients asking get nothing, not a 404
        return Response(status_code=204)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(404, f"no file {name!r} here")
        return Response((WEB / name).read_bytes(), media_type=STATIC[name], headers={"Cache-Control": "no-cache"})


def add_item_routes(app: FastAPI, served: Served) -> None:
    store, cfg = served.store, served.cfg
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
                "image_size": manifest.get("image_size"), "index": served.searcher.description,
                "device": served.encoder.device, "labelled": store.has_labels, "max_k": served.max_k,
                "filter_columns": {"label": "str", **store.metadata_columns}}

    @app.get("/items/{item_id:anypath}/image", responses={200: {"content": {"image/png": {}}}})
    def item_image(item_id: str) -> Response:
        """The item's thumbnail; a file moved or deleted since extraction gets a placeholder tile with
        the reason (header X-Simsearch-Unavailable), so a result list is never broken."""
        row = served.row_of(item_id)
        try:
            return Response(served.thumbnails.png(row), media_type="image/png", headers={"Cache-Control": "max-age=3600"})
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
        row = served.row_of(item_id)
        return {**store.items[row], "row": row, "label": store.label_name(row),
                "image": f"/items/{quote(str(store.items[row]['id']), safe='')}/image",
                **({"metadata": store.metadata[row]} if store.metadata_columns else {})}


def add_search_routes(app: FastAPI, served: Served) -> None:
    store, searcher, encoder, cfg = served.store, served.searcher, served.encoder, served.cfg

    @app.get("/search")
    def search_by_item(item: str = Query(..., description="an item id or row"), k: int = 10,
                       filter: str | None = Query(None, description=FILTER_HELP)) -> dict[str, Any]:  # noqa: A002
        query = item_query(store, served.row_of(item))
        return result_json(store, answer(store, searcher, query, served.checked_k(k), lambda: encoder, select(store, filter)))

    @app.post("/search")
    async def search_by_upload(request: Request, file: UploadFile = File(...), k: int = Form(10),
                               filter: str | None = Form(None, description=FILTER_HELP)) -> dict[str, Any]:  # noqa: A002
        k = served.checked_k(k)
        selection = select(store, filter)  # parsed once: a bad filter is a 400 before the upload is embedded
        image = await read_upload(request, file, served.max_bytes, cfg.serve.max_upload_mb)
        vector = await served.batcher.embed(image)
        query = SearchQuery("vector", file.filename or "upload", vector=vector)
        result = await asyncio.to_thread(answer, store, searcher, query, k, lambda: encoder, selection)
        result.query = {"file": query.caption}
        return result_json(store, result)


async def read_upload(request: Request, file: UploadFile, max_bytes: int, max_upload_mb: float) -> Image.Image:
    """The uploaded image, decoded as a stored one; over the limit: 413; empty or unreadable: 400."""
    declared = int(request.headers.get("content-length") or 0)
    if declared > max_bytes + MULTIPART_OVERHEAD_BYTES:
        raise HTTPException(413, f"upload over serve.max_upload_mb={max_upload_mb}")
    data = await file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HTTPException(413, f"upload over serve.max_upload_mb={max_upload_mb}")
    if not data:
        raise HTTPException(400, "the uploaded file is empty")
    try:
        return await asyncio.to_thread(decode_image, io.BytesIO(data))
    except UnreadableImage as error:
        raise HTTPException(400, f"the upload is not a readable image: {error}") from None


def server_config(app: FastAPI, cfg: DictConfig, log_level: str = "info") -> Any:
    """The uvicorn configuration of `simsearch serve` (tests start the same one)."""
    import uvicorn

    return uvicorn.Config(app, host=cfg.serve.host, port=cfg.serve.port, log_level=log_level,
                          http=header_timeout_protocol(cfg.serve.header_timeout_s))


