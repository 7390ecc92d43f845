"""Tests for the web demo: upload checks and command-line errors, and the page end to end in a browser.

The end-to-end test starts `python -m xcos_tf.demo` as a server process with a tiny exported
model, drives the page in headless Chromium through Playwright, uploads two faces from
../shared and checks that the score and the picture appear, that bad uploads give a message on
the page, that the browser makes no request beyond loopback, and that stopping the server
leaves nothing behind.
"""
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import keras
import numpy as np
import pytest

from xcos_tf import demo

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Debian's package: Playwright cannot download its own browser here.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SERVER_START_TIMEOUT = 150  # measured 19 s here (2 cores, load average 9): room for a busier machine
PAGE_TIMEOUT_MS = 30_000
THRESHOLD = 0.3
# The page is served from the float32 TFLite export: the server then never imports TensorFlow,
# which saves more start-up time (loading the SavedModel took 17 s here, load average 11) than
# converting costs (about 4 s).
SERVE_FORMAT = "tflite"


# === Upload checks: no server, no browser ===


def test_read_upload_decodes_an_accepted_photo(tmp_path):
    import cv2

    path = tmp_path / "face.png"
    cv2.imwrite(str(path), np.full((20, 30, 3), 200, np.uint8))
    image = demo.read_upload(str(path), "photo A (face.png)", max_bytes=demo.MB)
    assert image.shape == (20, 30, 3) and image.dtype == np.uint8


@pytest.mark.parametrize(
    "file_name, content, max_bytes, message",
    [
        ("notes.txt", b"hello", 10**6, "file type .txt is not accepted"),
        ("anim.gif", b"GIF89a", 10**6, "file type .gif is not accepted"),
        ("big.jpg", b"\xff\xd8" + b"\0" * 3000, 1000, "larger than the"),
        ("broken.jpg", b"this is not a jpeg", 10**6, "not a decodable image"),
        ("cut.jpg", b"\xff\xd8\xff\xe0" + b"\1" * 200, 10**6, "truncated image file"),
        ("empty.png", b"", 10**6, "empty file"),
    ],
)
def test_read_upload_refuses_bad_files_with_a_named_reason(tmp_path, file_name, content, max_bytes, message):
    path = tmp_path / file_name
    path.write_bytes(content)
    with pytest.raises(demo.UploadError, match=message) as error:
        demo.read_upload(str(path), f"photo B ({file_name})", max_bytes=max_bytes)
    assert f"photo B ({file_name})" in str(error.value)


def test_read_upload_refuses_too_many_pixels_before_decoding(tmp_path, monkeypatch):
    import cv2

    path = tmp_path / "huge.png"
    cv2.imwrite(str(path), np.zeros((200, 300, 3), np.uint8))
    monkeypatch.setattr(demo.align, "decode_image", lambda *args, **kwargs: pytest.fail("decoded"))
    with pytest.raises(demo.UploadError, match=r"\(huge.png\): 300x200 pixels is more than the 0.05 megapixel"):
        demo.read_upload(str(path), "photo A (huge.png)", max_bytes=demo.MB, max_pixels=50_000)


def test_summary_reads_decision_score_and_notes():
    result = {"score": 0.61234, "threshold": 0.3, "decision": "same", "notes": ["photo B: 3 faces found"]}
    assert demo.summary_markdown(result) == (
        "### Same person: score 0.612 (threshold 0.300)\n- photo B: 3 faces found"
    )
    no_threshold = dict(result, threshold=None, decision=None, notes=[])
    assert "no same/different decision" in demo.summary_markdown(no_threshold)


class _FixedRuntime:
    """A stand-in exported model: every pair scores 0.8, uniform attention."""

    threshold = 0.5

    def verify(self, image_a, image_b):
        assert image_a.shape == image_b.shape == (1, 112, 112, 3)
        return {
            "score": np.array([0.8], np.float32),
            "cos_map": np.full((1, 7, 7), 0.8, np.float32),
            "attention_map": np.full((1, 7, 7), 1 / 49, np.float32),
        }


def test_compare_uploads_finds_the_face_in_a_large_close_up(shared_dir, tmp_path):
    import cv2

    from xcos_tf.data import align

    # Scaled to 1600 px the face is too large for YuNet (no face found); detection runs on a
    # copy of at most explain.DETECTION_MAX_SIDE px, alignment on the full-resolution photo.
    face = align.read_image(shared_dir / "data" / "lfw" / "images" / "AJ_Cook" / "AJ_Cook_0001.jpg")
    path = tmp_path / "close_up.jpg"
    close_up = cv2.resize(face, (1600, 1600), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(path), cv2.cvtColor(close_up, cv2.COLOR_RGB2BGR))
    aligner = align.FaceAligner(shared_dir / "models" / "yunet.onnx", choose="largest")
    upload = {"path": str(path), "orig_name": "close_up.jpg"}
    summary, picture = demo.compare_uploads(upload, upload, _FixedRuntime(), aligner, max_bytes=10 * demo.MB)
    assert summary == "### Same person: score 0.800 (threshold 0.500)"
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[1] > 600


def test_missing_photo_is_named(tmp_path):
    with pytest.raises(demo.UploadError, match="photo A is missing"):
        demo.compare_uploads(None, {"path": "b.jpg"}, runtime_model=None, aligner=None, max_bytes=demo.MB)


def _run_demo_cli(*flag_args, cwd):
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "xcos_tf.demo", *flag_args], cwd=cwd, capture_output=True, text=True,
        timeout=120, env=dict(os.environ, PYTHONPATH=python_path, TMPDIR=str(cwd)),
    )


@pytest.mark.parametrize(
    "detector_bytes, message",
    [(None, "--detector: Face detector model not found"), (b"not onnx", "--detector: OpenCV")],
)
def test_cli_bad_detector_exits_2_naming_the_flag(tmp_path, detector_bytes, message):
    detector = tmp_path / "yunet.onnx"
    if detector_bytes is not None:
        detector.write_bytes(detector_bytes)
    result = _run_demo_cli("--model", str(tmp_path), "--detector", str(detector), cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not any(path.name.startswith("xcos_demo_") for path in tmp_path.iterdir())  # its folder is gone


def test_cli_folder_without_export_exits_2_naming_the_flag(shared_dir, tmp_path):
    detector = shared_dir / "models" / "yunet.onnx"
    result = _run_demo_cli("--model", str(tmp_path), "--detector", str(detector), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"--model {tmp_path} --format saved_model: No manifest.json" in result.stderr, result.stderr[-2000:]


# === End to end: server process + headless Chromium ===


def _free_loopback_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tiny_backbone_7x7(make_tiny_backbone):
    """The common_testing tiny backbone (stride 8) plus one pooling: 7x7 cells at 112x112, like the real ones."""
    base = make_tiny_backbone((112, 112, 3))
    return keras.Model(base.input, keras.layers.MaxPooling2D(2)(base.output), name="tiny_7x7")


@pytest.fixture
def exported_model(tmp_path, make_tiny_backbone):
    from xcos_tf import export, model

    keras.utils.set_random_seed(0)
    trainer = model.build_trainer(_tiny_backbone_7x7(make_tiny_backbone), num_classes=4, grid_channels=8)
    model_dir = tmp_path / "model"
    export.export_model(trainer, str(model_dir), formats=["saved_model", SERVE_FORMAT], threshold=THRESHOLD)
    return model_dir


@pytest.fixture
def browser_test_needs(shared_dir):
    """Skips before the slow export and server start when something the browser test needs is absent."""
    pytest.importorskip("gradio", reason='needs Gradio: pip install "xcos_tf[demo]"')
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright: pip install playwright")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"needs a Chromium browser at {CHROMIUM} (Debian: apt-get install chromium)")
    return sync_api


@pytest.fixture
def browser(browser_test_needs):
    with browser_test_needs.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class DemoServer:
    """`python -m xcos_tf.demo` in its own process, with an empty working folder and TMPDIR."""

    def __init__(self, model_dir, detector, root):
        self.port = _free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.workdir, self.tmpdir = root / "cwd", root / "tmp"
        self.workdir.mkdir(parents=True)
        self.tmpdir.mkdir()
        self.log_path = root / "server.log"
        python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, TMPDIR=str(self.tmpdir), PYTHONPATH=python_path)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "xcos_tf.demo", "--model", str(model_dir), "--detector", str(detector),
                 "--format", SERVE_FORMAT, "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
            )

    def log(self):
        return self.log_path.read_text(errors="replace")

    def wait_until_up(self):
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"demo server exited with code {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        pytest.fail(
            f"demo server did not answer at {self.url} within {SERVER_START_TIMEOUT} s:\n{self.log()[-3000:]}"
        )

    def stop(self):
        """SIGTERM (a clean stop that removes the upload folder), then SIGKILL if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture
def demo_server(browser_test_needs, shared_dir, exported_model, tmp_path):
    server = DemoServer(exported_model, shared_dir / "models" / "yunet.onnx", tmp_path / "server")
    try:
        server.wait_until_up()
        yield server
    finally:  # also when the test fails: no server outlives its test
        server.stop()


def _upload(page, box, path):
    page.locator(f"#photo_{box} input[type=file]").set_input_files(str(path))
    # Uploaded when the preview points at the served file (also for a corrupt one that cannot render).
    page.locator(f'#photo_{box} img[src*="{path.name}"]').wait_for(state="attached", timeout=PAGE_TIMEOUT_MS)


def _expect_message(page, *parts):
    for part in parts:
        page.get_by_text(part, exact=False).first.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)


def test_page_compares_two_photos_and_shows_errors(demo_server, browser, shared_dir, tmp_path):
    photo_a = shared_dir / "data" / "lfw" / "images" / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg"
    photo_b = shared_dir / "data" / "wild" / "010393.jpg"  # several faces: the largest is used
    no_face = shared_dir / "data" / "wild" / "064588.jpg"  # YuNet finds none here (index.json)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg")
    outside_requests = []

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.on("request", lambda request: outside_requests.append(request.url)
            if not request.url.startswith((demo_server.url, "data:", "blob:")) else None)
    page.goto(demo_server.url)
    _upload(page, "a", photo_a)
    _upload(page, "b", photo_b)
    page.locator("#compare").click()

    picture = page.locator("#explanation img")
    picture.wait_for(timeout=PAGE_TIMEOUT_MS)
    page.wait_for_function(
        "() => { const img = document.querySelector('#explanation img');"
        " return img && img.complete && img.naturalWidth > 0; }",
        timeout=PAGE_TIMEOUT_MS,
    )
    width, height, src = picture.evaluate("img => [img.naturalWidth, img.naturalHeight, img.src]")
    summary = page.locator("#summary").inner_text()
    page.screenshot(path=str(tmp_path / "demo_page.png"), full_page=True)
    assert width > 600 and height > 400, (width, height)
    # Gradio serves the picture from the demo's private upload folder under our TMPDIR.
    assert f"file={demo_server.tmpdir}" in src, src
    assert "score" in summary and f"threshold {THRESHOLD:.3f}" in summary, summary
    assert "Same person" in summary or "Different people" in summary, summary
    assert "faces found" in summary and "using the largest one" in summary, summary

    # A corrupt file: a message naming it, and the stale result is gone.
    _upload(page, "b", broken)
    page.locator("#compare").click()
    _expect_message(page, "photo B (broken.jpg)", "not a decodable image")
    assert "score" not in page.locator("#summary").inner_text()

    # A photo without a face (upside down: YuNet finds none).
    _upload(page, "b", no_face)
    page.locator("#compare").click()
    _expect_message(page, "photo B (064588.jpg)", "No face found")
    # A file over the size limit: Gradio refuses the upload itself (launch's max_file_size).
    too_large = tmp_path / "too_large.png"
    too_large.write_bytes(b"\0" * (demo.MAX_UPLOAD_MB * demo.MB + 1))
    page.locator("#photo_a input[type=file]").set_input_files(str(too_large))
    _expect_message(page, "too_large.png", "exceed the maximum allowed size")
    page.screenshot(path=str(tmp_path / "demo_page_error.png"), full_page=True)
    assert outside_requests == [], f"the page reached beyond loopback: {outside_requests}"
    # The server side: Gradio's HTTP client (httpx) logs every request it makes.
    server_requests = [line for line in demo_server.log().splitlines() if "HTTP Request:" in line]
    assert server_requests and all("//127.0.0.1:" in line for line in server_requests), server_requests

    # A clean stop removes the upload folder; nothing was written in the working folder.
    assert demo_server.stop() == 0, demo_server.log()[-3000:]
    assert list(demo_server.tmpdir.iterdir()) == [], list(demo_server.tmpdir.iterdir())
    assert list(demo_server.workdir.iterdir()) == [], list(demo_server.workdir.iterdir())

