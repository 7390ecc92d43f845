"""`--max_megapixels` (and the API's `max_megapixels`) in every program that reads photos (issue 16
item 5): a header over the limit is one line naming the file and the limit (exit 2) in a command
line, a listed reject in make_shards and gallery enroll; the flag lowers and raises the limit.

The photos are made here: a PNG of a few dozen bytes whose header claims 60000x60000 pixels, the
shipped 112x112 aligned crops (12,544 pixels: over a 0.01 megapixel limit, far under the default),
and a 7200x7200 PNG of one colour (51.8 megapixels in a few hundred KB: over the default 50).
"""
import json
import os
import subprocess
import sys
import types

import cv2
import numpy as np
import pytest
from common_testing import REPO_ROOT, huge_png

from xcos_tf import cli, demo, evaluate, explain, paths
from xcos_tf.data import align, image_io, prepare, shard_writer

MODEL_DIR = REPO_ROOT / "exported" / "default"
CROP_A, CROP_B = (REPO_ROOT / "exported" / "samples" / "aligned" / f"{name}.png" for name in "AB")
SMALL_LIMIT = "0.01 megapixel limit"  # --max_megapixels=0.01: a 112x112 crop is over it
needs_model = pytest.mark.skipif(not (MODEL_DIR / "manifest.json").is_file(), reason="exported/default is absent")


def _flags(**values):
    """A `define_flags()` namespace with these values, for a program's `main` in this process."""
    return types.SimpleNamespace(**{name: types.SimpleNamespace(value=value) for name, value in values.items()})


def _run(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300, **kwargs)


@pytest.fixture
def huge(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(huge_png())
    return path


@pytest.fixture(scope="module")
def large_file(tmp_path_factory):
    """A 7200x7200 PNG of one grey: a real image over the default limit in a small file."""
    path = tmp_path_factory.mktemp("large") / "large.png"
    cv2.imwrite(str(path), np.full((7200, 7200, 3), 128, np.uint8))
    assert path.stat().st_size < 1_000_000
    return path


# === The flag's value ===

def test_megapixels_become_a_pixel_count():
    assert image_io.pixel_limit(50) == image_io.MAX_PIXELS == 50_000_000
    assert image_io.pixel_limit(0.01) == 10_000 and image_io.pixel_limit("2.5") == 2_500_000
    for wrong in (0, -1, float("nan"), float("inf"), "many", None, True):
        with pytest.raises(ValueError, match="megapixel limit must be a finite number > 0"):
            image_io.pixel_limit(wrong)
    with pytest.raises(cli.UserError, match=r"^--max_megapixels: .* Received: 0.0$"):
        cli.max_pixels(0.0)


@pytest.mark.parametrize("value", ["0", "-3", "nan"])
def test_a_wrong_flag_value_exits_2_in_one_line(value):
    result = _run("-m", "xcos_tf.explain", CROP_A, CROP_B, "--model", MODEL_DIR, f"--max_megapixels={value}")
    assert result.returncode == 2 and result.stderr.startswith("error: --max_megapixels: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_genuinely_large_image_needs_the_flag(large_file):
    with pytest.raises(image_io.ImageTooLargeError, match="7200x7200 pixels is more than the 50 megapixel limit"):
        image_io.read_image(large_file)
    assert image_io.read_image(large_file, image_io.pixel_limit(60)).shape == (7200, 7200, 3)


# === Command lines: one line naming the file and the limit, exit 2 ===

@needs_model
def test_explain_lowers_and_keeps_the_limit(capsys, huge):
    values = dict(model=str(MODEL_DIR), format="onnx", out="", json=True, detector=paths.DEFAULT_DETECTOR,
                  method="xcos", choose="largest", max_megapixels=50.0)
    with pytest.raises(SystemExit) as stopped:
        explain.main(["explain", str(huge), str(CROP_B)], _flags(**values))
    assert stopped.value.code == 2
    assert capsys.readouterr().err == f"error: {huge}: 60000x60000 pixels is more than the 50 megapixel limit\n"
    with pytest.raises(SystemExit) as stopped:
        explain.main(["explain", str(CROP_A), str(CROP_B)], _flags(**dict(values, max_megapixels=0.01)))
    assert stopped.value.code == 2
    assert capsys.readouterr().err == f"error: {CROP_A}: 112x112 pixels is more than the {SMALL_LIMIT}\n"
    explain.main(["explain", str(CROP_A), str(CROP_B)], _flags(**values))  # the default admits the crops
    assert 0 < json.loads(capsys.readouterr().out)["score"] <= 1


class _Crops:
    """Stands in for the face aligner: the photos are aligned crops."""

    def align(self, image, assume_aligned=None):
        del assume_aligned
        return align.aligned_crop(image)


def _lfw_folder(root, photos):
    """An LFW-like folder (pairs.txt: one fold, A 1-2 same, A 1 - B 1 different) of these photos."""
    (root / "images").mkdir(parents=True)
    (root / "pairs.txt").write_text("1\nA 1 2\nA 1 B 1\n")
    for name, path in zip(("A/A_0001.jpg", "A/A_0002.jpg", "B/B_0001.jpg"), photos):
        (root / "images" / name).parent.mkdir(exist_ok=True)
        (root / "images" / name).write_bytes(path.read_bytes())  # read by content, whatever the name
    return root


def test_evaluate_lowers_and_keeps_the_limit(tmp_path, capsys, huge):
    lfw = _lfw_folder(tmp_path / "lfw", (CROP_A, CROP_B, CROP_A))
    assert evaluate.load_lfw(lfw, _Crops()).faces.shape == (3, 112, 112, 3)  # the default admits the crops
    with pytest.raises(image_io.ImageTooLargeError, match=f"A_0001.jpg: 112x112 pixels is more than the {SMALL_LIMIT}"):
        evaluate.load_lfw(lfw, _Crops(), max_pixels=10_000)
    # The command line: the error names the photo and the limit, before any model is loaded.
    huge_lfw = _lfw_folder(tmp_path / "huge_lfw", (huge, CROP_B, CROP_A))
    values = dict(model="unused", format="onnx", pairs=str(huge_lfw), teacher=None, out_dir=str(tmp_path / "out"),
                  max_pairs=None, occluders=[], deletion_pairs=0, seed=0, methods=[],
                  detector=paths.DEFAULT_DETECTOR, max_megapixels=50.0)
    if not os.path.isfile(paths.DEFAULT_DETECTOR):
        pytest.skip(f"an LFW folder needs the face detector: {paths.DEFAULT_DETECTOR}")
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(["evaluate"], _flags(**values))
    message = capsys.readouterr().err.splitlines()[-1]  # after the progress lines
    assert stopped.value.code == 2 and message.startswith(f"error: --pairs {huge_lfw}: ")
    assert message.endswith("A_0001.jpg: 60000x60000 pixels is more than the 50 megapixel limit")


@needs_model
def test_gallery_lists_an_oversized_photo_as_a_reject_and_refuses_it_as_a_probe(tmp_path, huge):
    people = tmp_path / "people"
    for person, photos in (("ab", (CROP_A, CROP_B)), ("huge", (huge,))):
        (people / person).mkdir(parents=True)
        for photo in photos:
            (people / person / photo.name).write_bytes(photo.read_bytes())
    index = tmp_path / "index"
    enrolled = _run("-m", "xcos_tf.gallery", "enroll", "--model", MODEL_DIR, "--format", "onnx", "--images", people,
                    "--out", index, "--noprogress")
    assert enrolled.returncode == 0, enrolled.stderr
    assert "enrolled 2 new faces" in enrolled.stdout and "1 rejects" in enrolled.stdout
    assert "huge.png: 60000x60000 pixels is more than the 50 megapixel limit" in enrolled.stderr
    [reject] = json.loads((index / "rejects.json").read_text())
    assert "60000x60000 pixels" in reject["reason"]
    for probe, limit, message in ((huge, [], "60000x60000 pixels is more than the 50 megapixel limit"),
                                  (CROP_A, ["--max_megapixels=0.01"], f"112x112 pixels is more than the {SMALL_LIMIT}")):
        searched = _run("-m", "xcos_tf.gallery", "search", probe, "--gallery", index, "--format", "onnx", *limit)
        assert searched.returncode == 2 and searched.stderr == f"error: {probe}: {message}\n"
    admitted = _run("-m", "xcos_tf.gallery", "search", CROP_A, "--gallery", index, "--format", "onnx", "--json")
    assert admitted.returncode == 0 and json.loads(admitted.stdout)[str(CROP_A)][0]["identity"] == "ab"


@pytest.mark.skipif(not os.path.isfile(paths.DEFAULT_DETECTOR), reason="tflite_verify needs the face detector")
@needs_model
def test_tflite_verify_lowers_and_keeps_the_limit(huge):
    tool = ["tools/tflite_verify.py", "--model", MODEL_DIR / "xcos.tflite", "--detector", paths.DEFAULT_DETECTOR]
    refused = _run(*tool, huge, CROP_B)
    assert refused.returncode == 2
    assert refused.stderr == f"error: {huge}: 60000x60000 pixels is more than the 50 megapixel limit\n"
    lowered = _run(*tool, CROP_A, CROP_B, "--max_megapixels=0.01")
    assert lowered.returncode == 2 and lowered.stderr == f"error: {CROP_A}: 112x112 pixels is more than the {SMALL_LIMIT}\n"
    admitted = _run(*tool, CROP_A, CROP_B, "--json")
    assert admitted.returncode == 0, admitted.stderr
    assert 0 < json.loads(admitted.stdout)["score"] <= 1


def test_load_test_checks_the_flag_and_passes_it_to_the_demo(monkeypatch):
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    try:
        import load_test_demo
    finally:
        sys.path.pop(0)
    values = dict(model=str(MODEL_DIR), format="tflite", detector=paths.DEFAULT_DETECTOR, max_megapixels=0.01,
                  start_timeout=5.0)
    started = []

    class Exited:  # the demo process, which exits at once
        returncode = 1

        def __init__(self, command, **kwargs):
            started.append(command)

        def poll(self):
            return self.returncode

    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="the demo exited with code 1"):
        patch.setattr(load_test_demo.subprocess, "Popen", Exited)  # the subprocess module itself
        load_test_demo.start_demo(None, _flags(**values))
    assert "--max_megapixels=0.01" in started[0] and started[0][started[0].index("--detector") + 1] == values["detector"]
    result = _run("tools/load_test_demo.py", "--max_megapixels=0", "--requests=1")
    assert result.returncode == 2 and result.stderr.startswith("error: --max_megapixels: ")
    assert "successes" not in result.stdout  # no demo was started


# === The demo page ===

def test_demo_uploads_follow_the_limit(tmp_path, huge):
    uploads = [{"path": str(path), "orig_name": path.name} for path in (CROP_A, CROP_B)]
    with pytest.raises(demo.UploadError, match=rf"photo A \(A.png\): 112x112 pixels is more than the {SMALL_LIMIT}"):
        demo.compare_uploads(*uploads, runtime_model=None, aligner=None, max_bytes=demo.MB, max_pixels=10_000)
    assert demo.read_upload(str(CROP_A), "photo A (A.png)", max_bytes=demo.MB).shape == (112, 112, 3)
    with pytest.raises(demo.UploadError, match="60000x60000 pixels is more than the 50 megapixel limit"):
        demo.read_upload(str(huge), "photo A (huge.png)", max_bytes=demo.MB)


# === make_shards: a listed reject, the setting recorded only when not the default ===

def test_make_shards_rejects_over_the_limit_and_records_a_changed_limit(tmp_path, large_file):
    folder = tmp_path / "in" / "someone"
    folder.mkdir(parents=True)
    for path in (CROP_A, CROP_B, large_file):
        (folder / path.name).write_bytes(path.read_bytes())
    command = ["-m", "tools.make_shards", "--detector=none", "--assume_aligned", "--teacher=none", "--num_workers=1",
               f"--input={tmp_path / 'in'}"]
    default = _run(*command, f"--out_dir={tmp_path / 'default'}")
    assert default.returncode == 0, default.stderr
    manifest = json.loads((tmp_path / "default" / "manifest.json").read_text())
    assert manifest["num_records"] == 2 and "max_pixels" not in manifest["alignment"]  # as before the flag
    [reject] = manifest["rejects"]
    assert reject["path"] == "someone/large.png" and reject["reason"] == "unreadable"
    assert "7200x7200 pixels is more than the 50 megapixel limit" in reject["detail"]

    raised = _run(*command, f"--out_dir={tmp_path / 'raised'}", "--max_megapixels=60")
    assert raised.returncode == 0, raised.stderr
    manifest = json.loads((tmp_path / "raised" / "manifest.json").read_text())
    assert manifest["num_records"] == 3 and not manifest["rejects"]
    assert manifest["alignment"]["max_pixels"] == 60_000_000

    # Another limit is another setting: the shards already there are not mixed with new ones.
    changed = _run(*command, f"--out_dir={tmp_path / 'default'}", "--max_megapixels=0.01")
    assert changed.returncode == 2 and "other settings (alignment" in changed.stderr, changed.stderr


def test_face_preparer_reads_bytes_and_files_with_the_limit(tmp_path):
    settings = prepare.Settings(detector=None, assume_aligned=True, max_pixels=10_000)
    preparer = prepare.FacePreparer(settings)
    for source in (str(CROP_A), CROP_A.read_bytes()):
        rejected = preparer.prepare("A.png", source)
        assert isinstance(rejected, prepare.Reject) and rejected.reason == "unreadable"
        assert rejected.detail == f"A.png: 112x112 pixels is more than the {SMALL_LIMIT}"
    assert isinstance(prepare.FacePreparer(prepare.Settings(detector=None, assume_aligned=True)).prepare(
        "A.png", str(CROP_A)), prepare.PreparedFace)
    assert shard_writer._alignment_config(settings)["max_pixels"] == 10_000


# === The Python API and export ===

@needs_model
def test_api_verify_and_load_take_max_megapixels(huge):
    import xcos_tf

    with pytest.raises(image_io.ImageTooLargeError, match=f"{huge}: 60000x60000 pixels is more than the 50 megapixel"):
        xcos_tf.verify(str(huge), str(CROP_B), format="onnx")
    with pytest.raises(image_io.ImageTooLargeError, match=f"{CROP_A}: 112x112 pixels is more than the {SMALL_LIMIT}"):
        xcos_tf.verify(str(CROP_A), str(CROP_B), format="onnx", max_megapixels=0.01)
    assert 0 < xcos_tf.verify(str(CROP_A), str(CROP_B), format="onnx")["score"] <= 1
    with pytest.raises(ValueError, match="megapixel limit must be a finite number > 0"):
        xcos_tf.load(format="onnx", max_megapixels=0)
    model = xcos_tf.load(format="onnx", max_megapixels=0.01)
    assert model.max_pixels == 10_000
    with pytest.raises(image_io.ImageTooLargeError, match=SMALL_LIMIT):
        model.embed(str(CROP_A))
    assert model.embed(align.read_image(CROP_A))["embedding"].ndim == 1  # arrays: decoded already, no file limit


def test_export_reads_calibration_faces_with_the_limit(tmp_path):
    from xcos_tf.export import deployment

    (tmp_path / "faces").mkdir()
    for path in (CROP_A, CROP_B):
        (tmp_path / "faces" / path.name).write_bytes(path.read_bytes())
    assert deployment.load_faces(tmp_path / "faces", limit=2).shape == (2, 112, 112, 3)
    with pytest.raises(image_io.ImageTooLargeError, match=SMALL_LIMIT):
        deployment.load_faces(tmp_path / "faces", limit=2, max_pixels=10_000)
