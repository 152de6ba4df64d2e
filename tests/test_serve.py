"""`cifar-transfer serve` as a client meets it: the numbers of `predict --json`, batching, hostile
uploads, a full queue, SIGTERM under load, and the page in a real (headless) browser."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")
httpx = pytest.importorskip("httpx")

from conftest import png_bomb

from cifar_transfer.cli import main
from cifar_transfer.data.cifar10 import load_split
from cifar_transfer.serving.app import create_app
from cifar_transfer.serving.limits import Limits
from cifar_transfer.serving.model import load_served_model

SRC = Path(__file__).resolve().parents[1] / "src"
N_IMAGES = 6


@pytest.fixture(scope="module")
def bundle(run) -> Path:
    """The tiny run with flip TTA switched on: served numbers must include T and the mirror."""
    meta = json.loads((run / "model.json").read_text())
    assert meta["temperature"] != 1.0
    meta["tta"] = "flip"
    (run / "model.json").write_text(json.dumps(meta))
    return run


@pytest.fixture(scope="module")
def photos(cifar_dir, tmp_path_factory) -> list[Path]:
    """Six CIFAR images upscaled to 96x96 as photos would be, PNG and JPEG."""
    root = tmp_path_factory.mktemp("photos")
    x, _ = load_split(cifar_dir, "train")
    paths = []
    for i in range(N_IMAGES):
        path = root / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).resize((96, 96)).save(path, quality=95)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def served(bundle):
    return load_served_model(bundle)


def predict_json(bundle: Path, paths: list[Path], batch_size: int, capsys) -> list[dict]:
    capsys.readouterr()
    assert main(["predict", str(bundle), *map(str, paths), "--json", "--top", "10",
                 "--batch-size", str(batch_size)]) == 0  # fmt: skip
    return json.loads(capsys.readouterr().out)


def image_post(client, raw: bytes, ctype: str = "image/png", url: str = "/predict?top=10"):
    return client.post(url, content=raw, headers={"content-type": ctype})


@contextlib.contextmanager
def live_server(served, limits: Limits):
    """The app on a real uvicorn in a thread, on a free 127.0.0.1 port: (base URL, Server)."""
    import uvicorn

    app = create_app(served, limits)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app.state.server
    finally:
        server.should_exit = True
        thread.join(60)


class SlowPredictor:
    """A predictor whose forward passes take `delay` seconds longer (a busy or large model)."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay = inner, delay
        self.classes, self.geometry = inner.classes, inner.geometry

    def logits(self, images):
        time.sleep(self.delay)
        return self.inner.logits(images)


# ----------------------------------------------------------------------------- the numbers


def test_served_probabilities_are_predict_jsons_exactly(bundle, photos, served, capsys):
    """Same batch size, same floats. A batch's size can change the last bits (oneDNN picks its
    convolution kernel by batch size: measured <= 5e-7 on the logits between 1 and >= 2 images;
    the other images of a batch of the same size change nothing), so each side is compared at
    the batch it ran: alone vs --batch-size 1, one request of all six vs one batch of six."""
    from fastapi.testclient import TestClient

    alone = predict_json(bundle, photos, 1, capsys)
    together = predict_json(bundle, photos, 64, capsys)
    app = create_app(served, Limits())
    with TestClient(app) as client:
        for path, expected in zip(photos, alone):
            ctype = "image/png" if path.suffix == ".png" else "image/jpeg"
            r = image_post(client, path.read_bytes(), ctype)
            assert r.status_code == 200, r.text
            (got,) = r.json()["predictions"]
            assert got["top"] == expected["top"] and got["class"] == expected["class"]
        files = [("image", (p.name, p.read_bytes(), "application/octet-stream")) for p in photos]
        r = client.post("/predict?top=10", files=files)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [p["file"] for p in body["predictions"]] == [p.name for p in photos]
        for got, expected in zip(body["predictions"], together):
            assert got["top"] == expected["top"] and got["class"] == expected["class"]
        sizes = dict(app.state.server.batcher.stats.sizes)
        assert sizes == {1: N_IMAGES, N_IMAGES: 1}, sizes
        info = client.get("/info").json()
    assert body["model"] == info["model"] and info["model"].startswith("run@")
    meta = json.loads((bundle / "model.json").read_text())
    assert info["tta"] == "flip" and info["temperature"] == meta["temperature"]
    assert info["classes"] == meta["classes"] and info["resolution"] == meta["resolution"]
    assert info["val_acc"] == meta["val_acc"] and info["precision"] == "fp32"


def test_min_confidence_gives_class_null_like_predict(bundle, photos, served, capsys):
    from fastapi.testclient import TestClient

    capsys.readouterr()
    assert main(["predict", str(bundle), str(photos[0]), "--json", "--min-confidence", "1"]) == 0
    (expected,) = json.loads(capsys.readouterr().out)
    assert expected["class"] is None
    with TestClient(create_app(served, Limits(min_confidence=1.0))) as client:
        (got,) = image_post(client, photos[0].read_bytes(), "image/jpeg").json()["predictions"]
        assert got["class"] is None and got["top"][0]["class"] == expected["top"][0]["class"]
        (got,) = image_post(client, photos[0].read_bytes(), "image/jpeg",
                            "/predict?min_confidence=0").json()["predictions"]  # fmt: skip
        assert got["class"] == expected["top"][0]["class"]


def test_concurrent_requests_share_forward_passes(bundle, photos, served, capsys):
    alone = {p.name: e for p, e in zip(photos, predict_json(bundle, photos, 1, capsys))}
    n = 24
    with live_server(served, Limits(max_batch=8, max_wait_ms=100)) as (url, server):
        def one(i: int) -> tuple[str, httpx.Response]:
            path = photos[i % N_IMAGES]
            with httpx.Client(base_url=url, timeout=60) as client:
                return path.name, image_post(client, path.read_bytes(), "image/jpeg")

        with ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(one, range(n)))
        stats = server.batcher.stats
    assert all(r.status_code == 200 for _, r in answers), [r.text for _, r in answers]
    assert stats.images == n and stats.batches < n and stats.largest > 1, stats
    for name, r in answers:  # batched: the batch size differs from predict's, so the last bits may
        (got,) = r.json()["predictions"]
        expected = alone[name]["top"]
        assert [t["class"] for t in got["top"]] == [t["class"] for t in expected]
        assert max(abs(a["prob"] - b["prob"]) for a, b in zip(got["top"], expected)) < 1e-6


def test_the_onnx_backend_serves_the_exported_file_with_predicts_numbers(
    bundle, photos, tmp_path, capsys
):
    pytest.importorskip("onnxruntime")
    from fastapi.testclient import TestClient

    copy = Path(shutil.copytree(bundle, tmp_path / "run"))
    assert main(["export", str(copy), "--format", "onnx"]) == 0  # RUN_DIR/model.onnx
    onnx_alone = predict_json(copy / "model.onnx", photos[:2], 1, capsys)
    torch_alone = predict_json(copy, photos[:2], 1, capsys)
    served = load_served_model(copy, "onnx")
    assert served.backend == "onnx" and served.info["tta"] == "flip"
    with TestClient(create_app(served, Limits())) as client:
        for path, expected, torch_expected in zip(photos, onnx_alone, torch_alone):
            (got,) = image_post(client, path.read_bytes(), "image/jpeg").json()["predictions"]
            assert got["top"] == expected["top"]  # the same file at the same batch size
            assert got["top"][0]["class"] == torch_expected["top"][0]["class"]
            assert abs(got["top"][0]["prob"] - torch_expected["top"][0]["prob"]) < 1e-4


# ----------------------------------------------------------------------------- hostile inputs


@pytest.fixture(scope="module")
def hostile(photos) -> dict[str, tuple[int, dict]]:
    """name -> (expected status, httpx request arguments)."""
    jpeg = photos[0].read_bytes()
    big = 3 * 1024 * 1024  # the servers below take 1 MiB

    def chunks():
        for _ in range(big // 65536):
            yield b"\0" * 65536

    def raw(body, ctype="image/png"):
        return {"content": body, "headers": {"content-type": ctype}}

    nine = [("image", (f"{i}.jpg", jpeg, "image/jpeg")) for i in range(9)]
    return {
        "empty body": (422, raw(b"")),
        "text file": (422, raw(b"just some notes, not an image\n" * 20)),
        "text file in a form": (422, {"files": [("image", ("notes.png", b"hello", "image/png"))]}),
        "truncated JPEG": (422, raw(jpeg[: len(jpeg) // 2], "image/jpeg")),
        "PNG bomb (20000 x 20000)": (422, raw(png_bomb(20000, 20000))),
        "PNG bomb (12000 x 12000)": (422, raw(png_bomb(12000, 12000))),  # PIL only warns here
        "over-limit body": (413, raw(b"\0" * big)),
        "over-limit body, chunked": (413, raw(chunks())),
        "wrong content type": (415, raw(jpeg, "text/plain")),
        "curl's default form type": (415, raw(jpeg, "application/x-www-form-urlencoded")),
        "JSON": (415, raw(b'{"path": "/etc/passwd"}', "application/json")),
        "form without files": (422, raw(
            b'--xx\r\nContent-Disposition: form-data; name="path"\r\n\r\n/etc/passwd\r\n--xx--\r\n',
            "multipart/form-data; boundary=xx",
        )),
        "too many files": (400, {"files": nine}),
        "bad query": (422, {**raw(jpeg, "image/jpeg"), "params": {"top": "zero"}}),
    }


def check_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    assert r.text.endswith("\n") and r.text.count("\n") == 1, r.text  # one JSON line
    body = json.loads(r.text)
    assert list(body) == ["error"] and len(body["error"]) > 20
    return body["error"]


def test_each_hostile_upload_gets_its_4xx_line_while_good_ones_succeed(served, photos, hostile):
    good = photos[1].read_bytes()
    limits = Limits(max_body=1024 * 1024, max_files=8)
    with live_server(served, limits) as (url, _), ThreadPoolExecutor(8) as pool:
        def send_good(_: int) -> int:
            with httpx.Client(base_url=url, timeout=60) as client:
                return image_post(client, good).status_code

        background = [pool.submit(send_good, i) for i in range(16)]  # good load meanwhile
        messages = {}
        for name, (status, kwargs) in hostile.items():
            with httpx.Client(base_url=url, timeout=60) as client:
                r = client.post("/predict", **kwargs)
            messages[name] = check_error(r, status)
        assert [f.result() for f in background] == [200] * 16
        with httpx.Client(base_url=url, timeout=60) as client:
            assert image_post(client, good).status_code == 200
            for method, path, status in (("GET", "/nope", 404), ("GET", "/predict", 405),
                                         ("GET", "/../../etc/passwd", 404)):  # fmt: skip
                check_error(client.request(method, path), status)
    assert "empty upload" in messages["empty body"]
    assert "not an image" in messages["text file"] and messages["text file in a form"].startswith("notes.png: ")
    assert "truncated" in messages["truncated JPEG"]
    for name in ("PNG bomb (20000 x 20000)", "PNG bomb (12000 x 12000)"):
        assert "decompression bomb" in messages[name] and "downscale" in messages[name]
    assert "--max-body" in messages["over-limit body"] == messages["over-limit body, chunked"]
    assert "image/jpeg" in messages["wrong content type"] and "multipart" in messages["JSON"]
    assert "no files" in messages["form without files"]
    assert "top" in messages["bad query"]


def test_a_full_queue_answers_503_with_retry_after_and_the_accepted_finish(served, photos):
    slow = dataclasses.replace(served, predictor=SlowPredictor(served.predictor, 0.4))
    body = photos[0].read_bytes()
    with live_server(slow, Limits(max_batch=1, max_queue=2, max_wait_ms=0)) as (url, _):
        def one(_: int) -> httpx.Response:
            with httpx.Client(base_url=url, timeout=60) as client:
                return image_post(client, body, "image/jpeg")

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(8)))
    statuses = sorted(r.status_code for r in answers)
    assert 503 in statuses and statuses.count(200) >= 2 and set(statuses) == {200, 503}, statuses
    for r in answers:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and "--max-queue" in check_error(r, 503)


def test_a_request_slower_than_the_timeout_gets_504(served, photos):
    slow = dataclasses.replace(served, predictor=SlowPredictor(served.predictor, 1.5))
    with live_server(slow, Limits(timeout=0.5)) as (url, _), httpx.Client(base_url=url) as client:
        r = image_post(client, photos[0].read_bytes(), "image/jpeg")
        assert "--timeout" in check_error(r, 504)
        assert client.get("/health").json()["status"] == "ok"


# ----------------------------------------------------------------------------- the real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "server exited"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError("server did not become healthy")


def test_sigterm_under_load_answers_every_accepted_request(bundle, photos):
    """The real command on a free port; SIGTERM while requests wait in the batcher (each batch
    waits 300 ms to fill): every request already sent gets its 200, then the server exits."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cifar_transfer", "serve", str(bundle), "--port", str(port),
         "--max-wait-ms", "300", "--max-batch", "64", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        wait_healthy(url, proc)
        body = photos[2].read_bytes()
        stop = threading.Event()
        results: list[tuple[float, float, object]] = []  # (sent, answered, status or exception)

        def client_loop() -> None:
            with httpx.Client(base_url=url, timeout=60) as client:
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        outcome: object = image_post(client, body, "image/jpeg").status_code
                    except httpx.TransportError as e:
                        outcome = e
                    results.append((sent, time.monotonic(), outcome))

        threads = [threading.Thread(target=client_loop) for _ in range(8)]
        for t in threads:
            t.start()
        while len(results) < 16:
            time.sleep(0.05)
        stop.set()  # no request starts after the signal: each one sent was accepted
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    in_flight = [r for r in results if r[0] < killed_at < r[1]]
    assert in_flight, "no request was in flight at SIGTERM: the test proves nothing"
    assert all(outcome == 200 for _, _, outcome in results), [o for *_, o in results if o != 200]
    assert proc.returncode == 128 + signal.SIGTERM, err  # like every command under SIGTERM


def test_serve_refuses_bad_options_in_one_line(bundle, tmp_path, capsys):
    cases = [
        (["--max-batch", "0"], "--max-batch 0"),
        (["--min-confidence", "2"], "--min-confidence 2"),
        (["--max-queue", "4", "--max-batch", "8"], "--max-queue 4"),
        (["--backend", "onnx"], "export"),
    ]
    for extra, fragment in cases:
        assert main(["serve", str(bundle), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert main(["serve", str(tmp_path)]) == 2
    assert "model.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the page


CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--disable-dev-shm-usage",
)  # fmt: skip


class DevTools:
    """Chromium's DevTools protocol over --remote-debugging-pipe (fd 3 in, fd 4 out, messages
    ending in NUL): no websocket client, no Playwright, no browser download."""

    def __init__(self, chromium: str, profile: Path) -> None:
        to_child, self._out = os.pipe()
        self._in, from_child = os.pipe()

        def wire() -> None:  # in the child: the pipes become fds 3 and 4
            high_in = fcntl.fcntl(to_child, fcntl.F_DUPFD, 10)
            high_out = fcntl.fcntl(from_child, fcntl.F_DUPFD, 10)
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)

        self.proc = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}",
             "about:blank"],
            # preexec_fn: the one way to place the pipes at fds 3 and 4; it only calls dup.
            preexec_fn=wire, close_fds=False,  # noqa: PLW1509
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_child)
        os.close(from_child)
        self._buffer, self._next_id, self.session = b"", 0, None

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                assert time.monotonic() < deadline, f"no answer to {method}"
                chunk = os.read(self._in, 65536)
                assert chunk, "chromium closed the pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                assert "error" not in reply, (method, reply["error"])
                return reply["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close", timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.poll() is None:
            self.proc.kill()
        os.close(self._in)
        os.close(self._out)


def test_the_page_classifies_an_uploaded_image_in_headless_chromium(
    bundle, photos, served, tmp_path, capsys
):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium when it can)")
    (expected,) = predict_json(bundle, photos[3:4], 1, capsys)
    with live_server(served, Limits()) as (url, _):
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
        assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
        browser = DevTools(chromium, tmp_path / "profile")
        try:
            target = browser.call("Target.createTarget", url=url + "/")["targetId"]
            browser.session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            deadline = time.monotonic() + 60
            while not (browser.evaluate("document.getElementById('model').textContent") or "").startswith("model "):
                assert time.monotonic() < deadline, "the page did not load /info"
                time.sleep(0.1)
            root = browser.call("DOM.getDocument")["root"]["nodeId"]
            node = browser.call("DOM.querySelector", nodeId=root, selector="#files")["nodeId"]
            browser.call("DOM.setFileInputFiles", nodeId=node, files=[str(photos[3])])
            state = None
            while state not in ("done", "error"):
                assert time.monotonic() < deadline, f"no result on the page (state {state})"
                time.sleep(0.1)
                state = browser.evaluate("document.getElementById('results').dataset.state")
            shown = browser.evaluate(
                "JSON.stringify({cls: document.querySelector('.result').dataset.class,"
                " name: document.querySelector('.result .name').textContent,"
                " rows: [...document.querySelectorAll('.result .row')].map(r => r.dataset.class),"
                " status: document.getElementById('status').textContent})"
            )
        finally:
            browser.close()
    shown = json.loads(shown)
    assert state == "done", shown
    assert shown["name"] == photos[3].name and shown["cls"] == expected["class"], shown
    assert shown["rows"] == [t["class"] for t in expected["top"][:5]]
