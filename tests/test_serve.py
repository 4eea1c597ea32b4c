"""The search API and web page: every endpoint, every bad input, a real browser, a bounded load test."""

import asyncio
import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simsearch.config import load_config
from simsearch.items import ItemImages
from simsearch.store import Store, manifest_checksum
from tests.helpers import FASHION_MNIST, TINY, LiveServer, chromium_paths, client_for, copy_store, png_bytes, simsearch

fastapi = pytest.importorskip("fastapi")

from simsearch.server.app import create_app  # noqa: E402


def write_shapes(root: Path) -> Path:
    """Two labelled folders of small real-looking images (two classes of shapes)."""
    rng = np.random.default_rng(0)
    for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (root / label).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i:02d}.png")
    return root


def extract_shapes(root: Path, run_dir: Path) -> Path:
    """A labelled folder store of those images (ResNet-50, random weights)."""
    assert simsearch("extract", "data=folder", f"data.root={root}", *TINY, f"run.dir={run_dir}") == 0
    return run_dir


@pytest.fixture(scope="module")
def folder_images(tmp_path_factory) -> Path:
    """The images, written once for the module: no test changes them (one that does takes `own_folder_store`)."""
    return write_shapes(tmp_path_factory.mktemp("shapes") / "images")


@pytest.fixture(scope="module")
def folder_store_once(folder_images) -> Path:
    return extract_shapes(folder_images, folder_images.parent / "store")


@pytest.fixture
def folder_store(folder_store_once, tmp_path) -> Path:
    """tmp_path/store: the test's own copy of the module's store of the images (its data.root is theirs)."""
    return copy_store(folder_store_once, tmp_path / "store")


@pytest.fixture(scope="module")
def folder_client(folder_store_once):
    """One server, built once, of a copy of the module's store: for the tests that only send it requests."""
    with client_for(copy_store(folder_store_once, folder_store_once.parent / "served")) as client:
        yield client


@pytest.fixture
def own_folder_store(tmp_path) -> Path:
    """tmp_path/images and their store tmp_path/store, for a test that changes the images."""
    return extract_shapes(write_shapes(tmp_path / "images"), tmp_path / "store")


@pytest.fixture
def own_pixel_store(tmp_path) -> Path:
    """tmp_path/images and their raw-pixel store tmp_path/pixels, for a route test that changes the images."""
    root = write_shapes(tmp_path / "images")
    assert simsearch("extract", "data=folder", f"data.root={root}", "model=pixels", "model.image_size=8", *TINY[2:],
                     "run.dir=pixels") == 0
    return tmp_path / "pixels"


@pytest.fixture
def pixel_store(folder_images, tmp_path):
    """The same images embedded as raw pixels (no network to build): for tests of the routes alone."""
    assert simsearch("extract", "data=folder", f"data.root={folder_images}", "model=pixels", "model.image_size=8",
                     *TINY[2:], "run.dir=pixels") == 0
    return tmp_path / "pixels"


def test_health_item_and_image_endpoints(folder_client):
    health = folder_client.get("/health").json()
    assert health["items"] == 24 and health["dim"] == 2048 and health["weights"] == "random" and health["labelled"]
    item = folder_client.get("/items/red/03.png").json()
    assert item["path"] == "red/03.png" and item["label"] == "red"
    response = folder_client.get("/items/red%2F03.png/image")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    Image.open(io.BytesIO(response.content)).verify()
    assert folder_client.get("/").text.startswith("<!doctype html>")
    assert "/search" in folder_client.get("/openapi.json").json()["paths"]


def test_item_ids_are_suggested_and_the_page_loads_its_script_and_style_from_files(pixel_store):
    """GET /items?prefix= (sorted, bounded); no inline script or style: the page fits a CSP of 'self'."""
    with client_for(pixel_store) as client:
        body = client.get("/items", params={"prefix": "red/0", "limit": 3}).json()
        assert body == {"prefix": "red/0", "ids": ["red/00.png", "red/01.png", "red/02.png"], "more": True}
        assert client.get("/items", params={"prefix": "blue/1"}).json()["ids"] == ["blue/10.png", "blue/11.png"]
        assert client.get("/items", params={"prefix": "green"}).json() == {"prefix": "green", "ids": [], "more": False}
        assert len(client.get("/items").json()["ids"]) == 20
        for limit in (0, 101):
            response = client.get("/items", params={"limit": limit})
            assert response.status_code == 422 and "limit" in response.json()["error"]

        html = client.get("/").text
        assert "<style" not in html and "<script>" not in html and " style=" not in html and "onclick" not in html
        assert '<script src="/static/app.js" defer></script>' in html and 'href="/static/app.css"' in html
        script, style = client.get("/static/app.js"), client.get("/static/app.css")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
        assert "[hidden] { display: none !important; }" in style.text  # the query box stays hidden at start
        response = client.get("/static/index.py")
        assert response.status_code == 404 and "no file 'index.py'" in response.json()["error"]
        assert client.get("/static/..%2Fstages%2Fserve.py").status_code == 404
        assert '<link rel="icon" href="data:,">' in html  # a browser asks for no favicon.ico
        assert client.get("/favicon.ico").status_code == 204  # and a client that asks anyway gets no 404


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


def test_upload_search_embeds_like_the_store(folder_store, folder_images):
    with client_for(folder_store) as client:
        upload = (folder_images / "red" / "07.png").read_bytes()
        body = client.post("/search", files={"file": ("07.png", upload, "image/png")}, data={"k": "3"}).json()
    assert body["query"] == {"file": "07.png"}
    assert body["results"][0]["id"] == "red/07.png" and body["results"][0]["score"] > 0.999


def test_dataset_store_serves_pixels_through_the_manifest(tmp_path):
    assert simsearch("extract", "data=synthetic", "data.num_items=12", "model=pixels", "model.image_size=32", *TINY[2:],
                     "run.dir=store") == 0
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
def test_bad_requests(folder_client, path, status, words):
    response = folder_client.get(path)
    assert response.status_code == status and words in response.json()["error"]


def test_no_file_outside_the_data_root_is_served(pixel_store, tmp_path):
    store = Store.open(pixel_store)
    items = [dict(item) for item in store.items]
    items[0]["path"] = "../../outside.png"  # a tampered store
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (pixel_store / "items.jsonl").write_text("".join(__import__("json").dumps(i) + "\n" for i in items))
    manifest = __import__("json").loads((pixel_store / "manifest.json").read_text())
    manifest["sha256"].pop("items.jsonl")
    manifest["manifest_sha256"] = manifest_checksum(manifest)  # tampered by someone who knows the format
    (pixel_store / "manifest.json").write_text(__import__("json").dumps(manifest))
    with client_for(pixel_store) as client:
        response = client.get(f"/items/{items[0]['id'].replace('/', '%2F')}/image")
        assert response.status_code == 403 and "leaves the data root" in response.json()["error"]


# ---------------------------------------------------------------- a real server on loopback


@pytest.mark.slow
def test_bounded_load_on_loopback_has_no_failed_request(folder_store, folder_images):
    import httpx

    upload = (folder_images / "blue" / "02.png").read_bytes()

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
def test_concurrent_uploads_are_embedded_in_batches(folder_store, folder_images):
    import httpx

    upload = (folder_images / "red" / "02.png").read_bytes()
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


def screenshot(page) -> np.ndarray:
    """The page as the user sees it: (height, width, 3) pixels of the viewport."""
    return np.asarray(Image.open(io.BytesIO(page.get_screenshot_as_png())).convert("RGB")).astype(int)


def blank(pixels: np.ndarray, rect: dict) -> bool:
    """Whether the region of an element's rectangle (CSS px, device pixel ratio 1) is plain page background."""
    x, y, w, h = (int(rect[key]) for key in ("x", "y", "width", "height"))
    region = pixels[max(y, 0):y + h, max(x, 0):x + w]
    return region.size > 0 and bool((region >= 250).all())


@pytest.mark.slow
@pytest.mark.skipif(chromium_paths() is None, reason="no chromium and chromedriver (apt-get install chromium chromium-driver)")
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist (CI installs it)")
def test_browser_walk_as_a_person(tmp_path):
    """Start, random item, upload (busy while it is embedded), a bad upload (results cleared), search by id
    with suggestions and Enter, a result opened from the keyboard, the permalink reloaded and shared."""
    selenium = pytest.importorskip("selenium")  # noqa: F841
    from urllib.parse import parse_qs, urlparse

    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    assert simsearch("extract", "data=fashion_mnist", "data.limit=120", *TINY, "run.dir=store") == 0
    query = tmp_path / "query.png"
    ItemImages(Store.open(tmp_path / "store")).image(7).resize((112, 112)).save(query)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not pixels")
    browser, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1200,900",
                 "--force-device-scale-factor=1"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver)
    with LiveServer(tmp_path / "store") as url:
        page = webdriver.Chrome(options=options, service=service)
        try:
            wait = WebDriverWait(page, 60)
            element = page.find_element
            tiles = lambda: page.find_elements(By.CSS_SELECTOR, "#results .result")  # noqa: E731
            caption = lambda: element(By.ID, "query-caption").text  # noqa: E731
            item_in_url = lambda: parse_qs(urlparse(page.current_url).query).get("item", [None])[0]  # noqa: E731

            # start: no query box, no broken image, no results; nothing but the controls drawn
            page.get(url)
            wait.until(lambda p: "120 items" in element(By.ID, "info").text)
            assert not element(By.ID, "query").is_displayed() and tiles() == []
            assert not [e for e in page.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]
            drawn = screenshot(page)
            controls = element(By.ID, "drop").rect
            assert blank(drawn, {"x": 0, "y": controls["y"] + controls["height"] + 40, "width": 1100, "height": 400})

            # a random item: results, its id in the address bar
            element(By.ID, "random").click()
            wait.until(lambda p: len(tiles()) == 10 and item_in_url() is not None)
            assert caption().startswith(f"{item_in_url()} (") and "Precision@10" in caption()
            assert len(page.find_elements(By.CSS_SELECTOR, "#results .relevant, #results .irrelevant")) == 10

            # an upload: busy while it is embedded, then its results; the URL no longer names an item
            page.execute_script("""window.busySeen = false;
                new MutationObserver(() => { if (document.body.classList.contains('busy')) window.busySeen = true; })
                  .observe(document.body, {attributes: true});""")
            element(By.ID, "file").send_keys(str(query))
            wait.until(lambda p: caption().startswith("uploaded: query.png"))
            assert page.execute_script("return window.busySeen") and "busy" not in element(By.TAG_NAME, "body").get_attribute("class")
            assert tiles()[0].get_attribute("data-id") == "7" and item_in_url() is None
            results_rect = element(By.ID, "results").rect
            assert not blank(screenshot(page), results_rect)  # thumbnails drawn

            # a bad upload: the error, and no results left standing under it
            element(By.ID, "file").send_keys(str(not_an_image))
            wait.until(lambda p: "error" in element(By.ID, "status").get_attribute("class"))
            assert element(By.ID, "status").text.startswith("notes.png: the upload is not a readable image")
            assert tiles() == [] and not element(By.ID, "query").is_displayed()
            assert blank(screenshot(page), results_rect)  # where the thumbnails were: background only

            # search by id: suggestions as one types, Enter searches
            box = element(By.ID, "item")
            assert box.get_attribute("value") == ""  # the upload was the last query
            box.send_keys("11")
            wait.until(lambda p: len(p.find_elements(By.CSS_SELECTOR, "#item-ids option")) == 11)
            suggested = [o.get_attribute("value") for o in page.find_elements(By.CSS_SELECTOR, "#item-ids option")]
            assert suggested == ["11"] + [f"11{d}" for d in range(10)]
            box.send_keys("3", Keys.ENTER)
            wait.until(lambda p: caption().startswith("113 (") and len(tiles()) == 10)
            assert item_in_url() == "113" and "error" not in element(By.ID, "status").get_attribute("class")

            # a result is a link: reached with Tab and opened with Enter, it searches from itself
            third = tiles()[2]
            chosen = third.get_attribute("data-id")
            assert third.tag_name == "a" and parse_qs(urlparse(third.get_attribute("href")).query)["item"] == [chosen]
            page.execute_script("arguments[0].focus()", tiles()[1])
            page.switch_to.active_element.send_keys(Keys.TAB)
            assert page.switch_to.active_element.get_attribute("data-id") == chosen
            page.switch_to.active_element.send_keys(Keys.ENTER)
            wait.until(lambda p: caption().startswith(f"{chosen} (") and item_in_url() == chosen)
            shown = [t.get_attribute("data-id") for t in tiles()]

            # the permalink: back goes to the previous query, a reload or a shared link shows the same results
            page.back()
            wait.until(lambda p: caption().startswith("113 ("))
            page.forward()
            wait.until(lambda p: caption().startswith(f"{chosen} ("))
            link = page.current_url
            page.get("about:blank")
            page.get(link)
            wait.until(lambda p: caption().startswith(f"{chosen} (") and len(tiles()) == 10)
            assert [t.get_attribute("data-id") for t in tiles()] == shown
            assert element(By.ID, "query").is_displayed() and element(By.ID, "item").get_attribute("value") == chosen
            page.execute_script("window.scrollTo(0, 0)")
            drawn = screenshot(page)
            query_box = element(By.ID, "query-image").rect
            assert not blank(drawn, query_box) and not blank(drawn, tiles()[0].rect)
            shot = Path(os.environ.get("SIMSEARCH_SCREENSHOTS", tmp_path)) / "serve-page.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.save_screenshot(str(shot))
            assert shot.stat().st_size > 10_000

            # a permalink to an item that is not there: the error, no results
            page.get(f"{url}/?item=no-such-item")
            wait.until(lambda p: "no item 'no-such-item'" in element(By.ID, "status").text)
            assert tiles() == [] and not element(By.ID, "query").is_displayed()
        finally:
            page.quit()


# ---------------------------------------------------------------- hostile inputs (issue 11)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/items/%C2%B2", "/items/%C2%B2/image", "/search?item=%C2%B2", "/items/-0",
                                  "/search?item=%EF%BC%91"])
def test_non_ascii_and_signed_ids_are_404_not_500(folder_client, path):
    response = folder_client.get(path)
    assert response.status_code == 404 and "no item" in response.json()["error"]


@pytest.mark.slow
def test_malformed_multipart_gets_the_documented_error_shape(folder_client):
    response = folder_client.post("/search", content=b"--nope\r\nbroken", headers={"content-type": "multipart/form-data"})
    assert 400 <= response.status_code < 500 and set(response.json()) == {"error"}


@pytest.mark.slow
def test_an_oversized_upload_is_refused_while_it_streams_in(folder_store):
    """Driven through the ASGI interface: the app must stop reading long before the body ends."""

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
def test_newline_in_a_file_name_and_moved_files_get_images(own_folder_store, tmp_path):
    from urllib.parse import quote

    root = tmp_path / "images"
    Image.new("RGB", (30, 30), (9, 200, 9)).save(root / "red" / "line\nbreak.png")
    assert simsearch("extract", "data=folder", f"data.root={root}", *TINY, f"run.dir={own_folder_store}") == 0
    (root / "blue" / "04.png").unlink()
    with client_for(own_folder_store) as client:
        response = client.get(f"/items/{quote('red/line' + chr(10) + 'break.png', safe='')}/image")
        assert response.status_code == 200 and Image.open(io.BytesIO(response.content)).size == (90, 90)
        assert client.get("/search", params={"item": "red/line\nbreak.png", "k": 3}).status_code == 200
        moved = client.get("/items/blue%2F04.png/image")
        assert moved.status_code == 200 and "moved or deleted" in moved.headers["x-simsearch-unavailable"]
        Image.open(io.BytesIO(moved.content)).verify()


@pytest.mark.slow
def test_large_images_are_thumbnailed_once(own_folder_store, tmp_path, monkeypatch):
    import simsearch.server.thumbnails as serve_module

    big = tmp_path / "images" / "red" / "00.png"
    Image.new("RGB", (3000, 2000), (200, 30, 30)).save(big)
    calls = []
    original = serve_module.file_thumbnail
    monkeypatch.setattr(serve_module, "file_thumbnail", lambda path, px, root: calls.append(path) or original(path, px, root))
    with client_for(own_folder_store, "serve.thumbnail_px=128") as client:
        sizes = {Image.open(io.BytesIO(client.get("/items/red%2F00.png/image").content)).size for _ in range(3)}
    assert sizes == {(128, 85)} and len(calls) == 1


def test_concurrent_requests_for_one_large_image_decode_it_once(own_pixel_store, tmp_path, monkeypatch):

    import simsearch.server.thumbnails as serve_module

    Image.new("RGB", (2000, 2000), (30, 30, 200)).save(tmp_path / "images" / "blue" / "00.png")
    calls = []
    original = serve_module.file_thumbnail
    monkeypatch.setattr(serve_module, "file_thumbnail", lambda path, px, root: calls.append(path) or original(path, px, root))
    with client_for(own_pixel_store) as client:
        codes = []
        threads = [threading.Thread(target=lambda: codes.append(client.get("/items/blue%2F00.png/image").status_code))
                   for _ in range(8)]
        [thread.start() for thread in threads]
        [thread.join() for thread in threads]
    assert codes == [200] * 8 and len(calls) == 1


def test_serve_on_a_store_where_the_index_cannot_be_saved(pixel_store, monkeypatch):
    import simsearch.index as index_module

    def read_only(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(index_module, "save_index", read_only)
    with client_for(pixel_store) as client:
        assert client.get("/search", params={"item": "red/01.png", "k": 3}).status_code == 200
    assert not (pixel_store / "index.faiss").exists()
