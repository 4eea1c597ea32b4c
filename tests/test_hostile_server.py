"""The holes a hostile probe found in the server (issue 19), each tried again over HTTP: a blank upload, the
security headers, the Host, paths, slow uploads and headers, an unresolvable host, a port already taken."""

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import extract_pixels, one_sentence, simsearch, write_folder, write_image

# ---------------------------------------------------------------- 1. a blank upload


def test_a_blank_upload_is_a_400_with_the_reason(tmp_path):
    pytest.importorskip("fastapi")
    from tests.helpers import client_for, png_bytes

    root = tmp_path / "images"
    write_folder(root)
    assert extract_pixels(root) == 0
    with client_for(tmp_path / "store") as client:
        response = client.post("/search", files={"file": ("blank.png", png_bytes(Image.new("RGB", (12, 12))), "image/png")},
                               data={"k": "3"})
    assert response.status_code == 400 and "zero or non-finite embedding" in response.json()["error"]


# ---------------------------------------------------------------- 8. the server: headers, Host, paths, slow uploads


def test_every_answer_has_the_security_headers_and_the_page_satisfies_its_csp(store_dir):
    pytest.importorskip("fastapi")
    import base64
    import hashlib
    import re

    from tests.helpers import client_for

    with client_for(store_dir) as client:
        page = client.get("/")
        for response in (page, client.get("/health"), client.get("/items/nothing"), client.get("/search?item=0&k=2")):
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["x-frame-options"] == "DENY"
            assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    csp = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and "'unsafe-inline'" not in csp["script-src"]
    assert "'self'" in csp["script-src"] and "'self'" in csp["style-src"]  # the page's /static/app.js and app.css
    for script in re.findall(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", page.text, re.S):  # inline ones
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp["script-src"]
    for style in re.findall(r"<style[^>]*>(.*?)</style>", page.text, re.S) + re.findall(r'\sstyle="([^"]*)"', page.text):
        digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp["style-src"]


@pytest.mark.parametrize("host, status", [
    ("localhost", 200), ("127.0.0.1:8000", 200), ("[::1]:8000", 200), ("photos.lan", 200), ("[::1]", 200),
    ("evil.example", 400), ("127.0.0.1.evil.example", 400), ("", 400),
    ("localhost:80:evil", 400), ("localhost:abc", 400), ("localhost evil", 400), ("[::1]x", 400), ("[::1]:80:1", 400),
    ("::1", 400), ("localhost:123456", 400), ("photos.lan@evil.example", 400),
])
def test_only_allowed_hosts_are_answered(store_dir, host, status):
    pytest.importorskip("fastapi")
    from tests.helpers import client_for

    with client_for(store_dir, "serve.allowed_hosts=[photos.lan]") as client:
        response = client.get("/health", headers={"host": host})
    assert response.status_code == status
    if status == 400:
        assert "serve.allowed_hosts" in response.json()["error"]


def test_no_absolute_path_of_the_machine_in_any_answer(store_dir, tmp_path):
    pytest.importorskip("fastapi")
    from tests.helpers import client_for

    outside = tmp_path / "secret"
    write_image(outside / "x.png", seed=3)
    (tmp_path / "images" / "cats" / "000.png").unlink()
    (tmp_path / "images" / "cats" / "000.png").symlink_to(outside / "x.png")
    with client_for(store_dir) as client:
        answers = [client.get("/openapi.json"), client.get("/items/cats/000.png/image"), client.get("/items/%2Fetc%2Fpasswd"),
                   client.get("/health")]
    assert answers[1].status_code == 403
    for response in answers:
        text = response.text + json.dumps(dict(response.headers))
        assert str(tmp_path) not in text and "/root" not in text and "/tmp" not in text, text[:300]


def test_a_slow_upload_is_answered_408_within_the_time_limit(store_dir):
    pytest.importorskip("uvicorn")
    import socket

    from tests.helpers import LiveServer

    with LiveServer(store_dir, "serve.upload_timeout_s=1") as url:
        port = int(url.rsplit(":", 1)[1])
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                               b"boundary=x\r\nContent-Length: 5000\r\n\r\n--x\r\n")
            answer = b""
            while chunk := connection.recv(65536):  # the server answers, then closes
                answer += chunk
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408") and b"serve.upload_timeout_s" in answer, answer[:200]
    assert elapsed < 5


# ---------------------------------------------------------------- 11. the second probe: the server's connections, the cwd


class Served:
    """The app of `simsearch serve` under the uvicorn configuration `simsearch serve` runs (`server_config`),
    on a free port of 127.0.0.1, in a thread."""

    def __init__(self, store_dir: Path, *overrides: str):
        import threading

        import uvicorn

        from simsearch.config import load_config
        from simsearch.server.app import create_app, server_config
        from tests.helpers import free_port

        cfg = load_config([f"run.dir={store_dir}", "logger=none", "serve.device=cpu", f"serve.port={free_port()}",
                           *overrides])
        self.port = cfg.serve.port
        self.server = uvicorn.Server(server_config(create_app(cfg), cfg, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> int:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        return self.port

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_request_headers_sent_a_byte_at_a_time_are_cut_off(store_dir):
    pytest.importorskip("uvicorn")
    import socket

    with Served(store_dir, "serve.header_timeout_s=1") as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:  # a well-behaved client
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert connection.recv(65536).startswith(b"HTTP/1.1 200")
        for request_line in (b"", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"):  # new, then kept alive
            with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
                if request_line:
                    connection.sendall(request_line)
                    assert connection.recv(65536).startswith(b"HTTP/1.1 200")
                started, closed = time.monotonic(), None
                for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
                    try:
                        connection.sendall(bytes([byte]))
                        connection.settimeout(0.2)
                        if connection.recv(1024) == b"":
                            closed = time.monotonic() - started
                            break
                    except TimeoutError:
                        continue
                    except (BrokenPipeError, ConnectionResetError):
                        closed = time.monotonic() - started
                        break
                assert closed is not None and closed < 2.5, closed


def test_an_unresolvable_host_is_refused_before_the_model_is_loaded(store_dir, capsys, monkeypatch):
    import simsearch.stages.serve as serve_module

    monkeypatch.setattr(serve_module, "create_app", lambda cfg: pytest.fail("the app was built"))
    capsys.readouterr()
    assert simsearch("serve", f"run.dir={store_dir}", "serve.host=no-such-host.invalid", "logger=none") == 2
    assert "cannot be resolved" in one_sentence(capsys)


def test_a_port_already_taken_is_one_sentence(store_dir, capsys):
    pytest.importorskip("uvicorn")
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        capsys.readouterr()
        assert simsearch("serve", f"run.dir={store_dir}", f"serve.port={taken.getsockname()[1]}", "logger=none",
                         "serve.device=cpu") == 2
    error = capsys.readouterr().err
    assert "simsearch serve: error: cannot serve on 127.0.0.1" in error and "Traceback" not in error
