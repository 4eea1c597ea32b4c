"""The search API and web page: every endpoint, every bad input, a real browser, a bounded load test."""

import asyncio
import io
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simsearch.config import load_config
from simsearch.items import ItemImages
from simsearch.store import Store, manifest_checksum
from tests.conftest import FASHION_MNIST, TINY, simsearch

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from simsearch.stages.serve import create_app  # noqa: E402


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def folder_store(tmp_path):
    """A labelled folder store of small real-looking images (two classes of shapes)."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (root / label).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i:02d}.png")
    assert simsearch("extract", "data=folder", f"data.root={root}", *TINY, "run.dir=store") == 0
    return tmp_path / "store"


def client_for(store_dir, *overrides):
    cfg = load_config([f"run.dir={store_dir}", "logger=none", "serve.device=cpu", *overrides])
    return TestClient(create_app(cfg), base_url="http://localhost")  # a Host the server answers


def test_health_item_and_image_endpoints(folder_store):
    with client_for(folder_store) as client:
        health = client.get("/health").json()
        assert health["items"] == 24 and health["dim"] == 2048 and health["weights"] == "random" and health["labelled"]
        item = client.get("/items/red/03.png").json()
        assert item["path"] == "red/03.png" and item["label"] == "red"
        response = client.get("/items/red%2F03.png/image")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        Image.open(io.BytesIO(response.content)).verify()
        assert client.get("/").text.startswith("<!doctype html>")
        assert "/search" in client.get("/openapi.json").json()["paths"]


def test_search_by_item_equals_the_cli(folder_store, capsys):
    with client_for(folder_store) as client:
        body = client.get("/search", params={"item": "blue/05.png", "k": 5}).json()
    assert body["query"]["id"] == "blue/05.png" and len(body["results"]) == 5
    assert all(r["id"] != "blue/05.png" for r in body["results"]) and body["precision"] == 1.0
    assert body["results"][0]["image"].startswith("/items/blue%2F")
    capsys.readouterr()
    assert simsearch("search", f"run.dir={folder_store}", "query=blue/05.png", "search.k=5", "logger=none") == 0
    printed = [line.split()[-2] for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()
               and line.split()[0] in "12345"]
    assert printed == [r["id"] for r in body["results"]]


def test_upload_search_embeds_like_the_store(folder_store, tmp_path):
    with client_for(folder_store) as client:
        upload = (tmp_path / "images" / "red" / "07.png").read_bytes()
        body = client.post("/search", files={"file": ("07.png", upload, "image/png")}, data={"k": "3"}).json()
    assert body["query"] == {"file": "07.png"}
    assert body["results"][0]["id"] == "red/07.png" and body["results"][0]["score"] > 0.999


def test_dataset_store_serves_pixels_through_the_manifest(tmp_path):
    assert simsearch("extract", "data=synthetic", "data.num_items=12", *TINY, "run.dir=store") == 0
    with client_for(tmp_path / "store") as client:
        response = client.get("/items/4/image")
        assert response.status_code == 200
        assert Image.open(io.BytesIO(response.content)).size[0] >= 64  # 32 px items are enlarged


def bomb() -> bytes:
    """A small PNG that claims far more pixels than PIL's decompression-bomb limit."""
    return png_bytes(Image.new("1", (20_000, 20_000)))


@pytest.mark.slow
@pytest.mark.parametrize("upload, status, words", [
    (b"this is a text file", 400, "not a readable image"),
    (b"", 400, "empty"),
    (None, 400, "not a readable image"),  # truncated PNG
    ("bomb", 400, "decompression bomb"),
    ("big", 413, "max_upload_mb"),
])
def test_bad_uploads_get_a_4xx_json_error_and_serving_goes_on(folder_store, upload, status, words):
    with client_for(folder_store, "serve.max_upload_mb=0.5") as client:
        if upload is None:
            upload = png_bytes(Image.new("RGB", (64, 64), (9, 9, 9)))[:60]
        elif upload == "bomb":
            upload = bomb()
        elif upload == "big":
            upload = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)))
        response = client.post("/search", files={"file": ("x.png", upload, "image/png")})
        assert response.status_code == status and words in response.json()["error"]
        assert client.get("/health").status_code == 200


@pytest.mark.parametrize("path, status, words", [
    ("/items/nope.png", 404, "no item"),
    ("/items/..%2F..%2Fetc%2Fpasswd/image", 404, "no item"),
    ("/search?item=red/01.png&k=0", 422, "out of range"),
    ("/search?item=red/01.png&k=24", 422, "out of range"),
    ("/search?item=red/01.png&k=ten", 422, "k:"),
    ("/search", 422, "item"),
])
def test_bad_requests(folder_store, path, status, words):
    with client_for(folder_store) as client:
        response = client.get(path)
        assert response.status_code == status and words in response.json()["error"]


def test_no_file_outside_the_data_root_is_served(folder_store, tmp_path):
    store = Store.open(folder_store)
    items = [dict(item) for item in store.items]
    items[0]["path"] = "../../outside.png"  # a tampered store
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (folder_store / "items.jsonl").write_text("".join(__import__("json").dumps(i) + "\n" for i in items))
    manifest = __import__("json").loads((folder_store / "manifest.json").read_text())
    manifest["sha256"].pop("items.jsonl")
    manifest["manifest_sha256"] = manifest_checksum(manifest)  # tampered by someone who knows the format
    (folder_store / "manifest.json").write_text(__import__("json").dumps(manifest))
    with client_for(folder_store) as client:
        response = client.get(f"/items/{items[0]['id'].replace('/', '%2F')}/image")
        assert response.status_code == 403 and "leaves the data root" in response.json()["error"]


# ---------------------------------------------------------------- a real server on loopback


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LiveServer:
    def __init__(self, store_dir: Path, *overrides: str):
        import uvicorn

        self.port = free_port()
        self.app = app = create_app(load_config([f"run.dir={store_dir}", "logger=none", "serve.device=cpu", *overrides]))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.mark.slow
def test_bounded_load_on_loopback_has_no_failed_request(folder_store, tmp_path):
    import httpx

    upload = (tmp_path / "images" / "blue" / "02.png").read_bytes()

    async def load(url: str, clients: int, requests: int, kind: str) -> tuple[list[float], int]:
        latencies, failures, queue = [], 0, asyncio.Queue()
        for _ in range(requests):
            queue.put_nowait(None)

        async def client_loop(client: httpx.AsyncClient) -> None:
            nonlocal failures
            while not queue.empty():
                queue.get_nowait()
                start = time.perf_counter()
                if kind == "item":
                    response = await client.get(f"{url}/search", params={"item": "red/01.png", "k": 10})
                else:
                    response = await client.post(f"{url}/search", files={"file": ("q.png", upload, "image/png")})
                latencies.append((time.perf_counter() - start) * 1000)
                failures += response.status_code != 200

        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.wait_for(asyncio.gather(*(client_loop(client) for _ in range(clients))), timeout=120)
        return latencies, failures

    with LiveServer(folder_store) as url:
        for kind, clients, requests in (("item", 32, 200), ("upload", 32, 64)):
            latencies, failures = asyncio.run(load(url, clients, requests, kind))
            print(f"{kind} queries, {clients} clients: p50 {np.percentile(latencies, 50):.1f} ms, "
                  f"p95 {np.percentile(latencies, 95):.1f} ms, {failures} failed of {requests}")
            assert failures == 0 and len(latencies) == requests


@pytest.mark.slow
def test_concurrent_uploads_are_embedded_in_batches(folder_store, tmp_path):
    import httpx

    upload = (tmp_path / "images" / "red" / "02.png").read_bytes()
    server = LiveServer(folder_store, "serve.batch_wait_ms=200")
    batcher = server.app.state.batcher
    sizes, encode = [], batcher.encoder.encode
    batcher.encoder.encode = lambda images: sizes.append(len(images)) or encode(images)

    async def burst(url: str) -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            responses = await asyncio.gather(*(client.post(f"{url}/search", files={"file": ("q.png", upload, "image/png")})
                                               for _ in range(8)))
        return [r.status_code for r in responses]

    with server as url:
        assert asyncio.run(burst(url)) == [200] * 8
    assert sum(sizes) == 8 and max(sizes) > 1, sizes


def chromium_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.slow
@pytest.mark.skipif(chromium_paths() is None, reason="no chromium and chromedriver (apt-get install chromium chromium-driver)")
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist (CI installs it)")
def test_browser_searches_by_upload_and_by_click(tmp_path):
    selenium = pytest.importorskip("selenium")  # noqa: F841
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    assert simsearch("extract", "data=fashion_mnist", "data.limit=120", *TINY, "run.dir=store") == 0
    query = tmp_path / "query.png"
    ItemImages(Store.open(tmp_path / "store")).image(7).resize((112, 112)).save(query)
    browser, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1200,900"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver)
    with LiveServer(tmp_path / "store") as url:
        page = webdriver.Chrome(options=options, service=service)
        try:
            page.get(url)
            wait = WebDriverWait(page, 60)
            wait.until(lambda p: "items" in p.find_element(By.ID, "info").text)
            page.find_element(By.ID, "file").send_keys(str(query))
            wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#results .result")))
            tiles = page.find_elements(By.CSS_SELECTOR, "#results .result")
            assert len(tiles) == 10 and tiles[0].get_attribute("data-id") == "7"
            assert "uploaded: query.png" in page.find_element(By.ID, "query-caption").text
            clicked = tiles[3].get_attribute("data-id")
            tiles[3].click()
            wait.until(lambda p: p.find_element(By.ID, "query-caption").text.startswith(f"{clicked} ("))
            assert "Precision@10" in page.find_element(By.ID, "query-caption").text
            relevant = page.find_elements(By.CSS_SELECTOR, "#results .result.relevant, #results .result.irrelevant")
            assert len(relevant) == 10
            shot = Path(os.environ.get("SIMSEARCH_SCREENSHOTS", tmp_path)) / "serve-page.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.save_screenshot(str(shot))
            assert shot.stat().st_size > 10_000
        finally:
            page.quit()


# ---------------------------------------------------------------- hostile inputs (issue 11)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/items/%C2%B2", "/items/%C2%B2/image", "/search?item=%C2%B2", "/items/-0",
                                  "/search?item=%EF%BC%91"])
def test_non_ascii_and_signed_ids_are_404_not_500(folder_store, path):
    with client_for(folder_store) as client:
        response = client.get(path)
        assert response.status_code == 404 and "no item" in response.json()["error"]


@pytest.mark.slow
def test_malformed_multipart_gets_the_documented_error_shape(folder_store):
    with client_for(folder_store) as client:
        response = client.post("/search", content=b"--nope\r\nbroken", headers={"content-type": "multipart/form-data"})
        assert 400 <= response.status_code < 500 and set(response.json()) == {"error"}


@pytest.mark.slow
def test_an_oversized_upload_is_refused_while_it_streams_in(folder_store):
    """Driven through the ASGI interface: the app must stop reading long before the body ends."""
    from simsearch.stages.serve import create_app

    app = create_app(load_config([f"run.dir={folder_store}", "logger=none", "serve.device=cpu",
                                  "serve.max_upload_mb=0.25"]))
    chunk, chunks, pulled, sent = b"x" * 65536, 200, [], []
    header = b"--b\r\ncontent-disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n"

    async def receive():
        pulled.append(1)
        more = len(pulled) < chunks
        return {"type": "http.request", "body": header if len(pulled) == 1 else chunk, "more_body": more}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/search", "raw_path": b"/search", "query_string": b"",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"multipart/form-data; boundary=b")], "http_version": "1.1",
             "scheme": "http", "server": ("test", 80), "client": ("test", 1), "root_path": "", "app": app}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 413 and "max_upload_mb" in __import__("json").loads(body)["error"]
    assert len(pulled) <= 6  # (0.25 MB + 64 KB) / 64 KB: never the 12.5 MB the client would send


@pytest.mark.slow
def test_newline_in_a_file_name_and_moved_files_get_images(folder_store, tmp_path):
    from urllib.parse import quote

    root = tmp_path / "images"
    Image.new("RGB", (30, 30), (9, 200, 9)).save(root / "red" / "line\nbreak.png")
    assert simsearch("extract", "data=folder", f"data.root={root}", *TINY, f"run.dir={folder_store}") == 0
    (root / "blue" / "04.png").unlink()
    with client_for(folder_store) as client:
        response = client.get(f"/items/{quote('red/line' + chr(10) + 'break.png', safe='')}/image")
        assert response.status_code == 200 and Image.open(io.BytesIO(response.content)).size == (90, 90)
        assert client.get("/search", params={"item": "red/line\nbreak.png", "k": 3}).status_code == 200
        moved = client.get("/items/blue%2F04.png/image")
        assert moved.status_code == 200 and "moved or deleted" in moved.headers["x-simsearch-unavailable"]
        Image.open(io.BytesIO(moved.content)).verify()


@pytest.mark.slow
def test_large_images_are_thumbnailed_once(folder_store, tmp_path, monkeypatch):
    import simsearch.stages.serve as serve_module

    big = tmp_path / "images" / "red" / "00.png"
    Image.new("RGB", (3000, 2000), (200, 30, 30)).save(big)
    calls = []
    original = serve_module.file_thumbnail
    monkeypatch.setattr(serve_module, "file_thumbnail", lambda path, px: calls.append(path) or original(path, px))
    with client_for(folder_store, "serve.thumbnail_px=128") as client:
        sizes = {Image.open(io.BytesIO(client.get("/items/red%2F00.png/image").content)).size for _ in range(3)}
    assert sizes == {(128, 85)} and len(calls) == 1


def test_concurrent_requests_for_one_large_image_decode_it_once(folder_store, tmp_path, monkeypatch):
    import threading

    import simsearch.stages.serve as serve_module

    Image.new("RGB", (2000, 2000), (30, 30, 200)).save(tmp_path / "images" / "blue" / "00.png")
    calls = []
    original = serve_module.file_thumbnail
    monkeypatch.setattr(serve_module, "file_thumbnail", lambda path, px: calls.append(path) or original(path, px))
    with client_for(folder_store) as client:
        codes = []
        threads = [threading.Thread(target=lambda: codes.append(client.get("/items/blue%2F00.png/image").status_code))
                   for _ in range(8)]
        [thread.start() for thread in threads]
        [thread.join() for thread in threads]
    assert codes == [200] * 8 and len(calls) == 1


def test_serve_on_a_store_where_the_index_cannot_be_saved(folder_store, monkeypatch):
    import simsearch.index as index_module

    def read_only(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(index_module, "save_index", read_only)
    with client_for(folder_store) as client:
        assert client.get("/search", params={"item": "red/01.png", "k": 3}).status_code == 200
    assert not (folder_store / "index.faiss").exists()
