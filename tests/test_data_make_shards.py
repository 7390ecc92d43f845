"""Tests for tools/make_shards.py and xcos_tf.data.shard_writer: manifests, rejects,
determinism, resuming, pair shards; synthetic variants run without ../shared."""
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tensorflow as tf

from xcos_tf.data import align, pipeline, prepare, records, shard_writer

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CROP_SETTINGS = prepare.Settings(detector=None, assume_aligned=True)


def _smooth_face(rng):
    return cv2.resize(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), (112, 112))


@pytest.fixture
def crop_folder(tmp_path):
    """ImageFolder of 112x112 crops: 3 identities x 4, plus an empty and a truncated file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "crops"
    for identity in ("ann", "bob", "cyd"):
        (root / identity).mkdir(parents=True)
        for i in range(4):
            (root / identity / f"{i}.png").write_bytes(align.encode_image(_smooth_face(rng), "png"))
    (root / "bob" / "empty.jpg").write_bytes(b"")
    jpeg = align.encode_image(_smooth_face(rng), "jpeg")
    (root / "cyd" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "notes.txt").write_text("not an image")
    return root


def _make(root, out_dir, settings=CROP_SETTINGS, **kwargs):
    kwargs.setdefault("shard_mb", 0.008)  # about 2 faces per shard
    kwargs.setdefault("num_workers", 1)
    return shard_writer.make_face_shards(
        shard_writer.list_image_folder(root), root, out_dir, settings, progress=False, **kwargs
    )


def _files(out_dir):
    return {name: (out_dir / name).read_bytes() for name in sorted(os.listdir(out_dir))}


def test_manifest_counts_and_rejects(crop_folder, tmp_path):
    manifest = _make(crop_folder, tmp_path / "out")
    assert manifest["complete"] and manifest["kind"] == "faces"
    assert manifest["classes"] == ["ann", "bob", "cyd"] and manifest["num_classes"] == 3
    assert manifest["images_per_class"] == [4, 4, 4] and manifest["num_records"] == 12
    assert manifest["input"]["num_images"] == 14
    assert sorted((r["path"], r["reason"]) for r in manifest["rejects"]) == [
        ("bob/empty.jpg", "unreadable"), ("cyd/cut.jpg", "unreadable")]
    assert manifest["reject_counts"] == {"unreadable": 2}
    assert "truncated" in next(r["detail"] for r in manifest["rejects"] if r["path"] == "cyd/cut.jpg")
    assert len(manifest["shards"]) > 1 and sum(s["records"] for s in manifest["shards"]) == 12
    for shard in manifest["shards"]:
        assert records.sha256_file(tmp_path / "out" / shard["file"]) == shard["sha256"]
    # Labels follow the sorted identities; the pipeline's scan reads the same shards.
    decoded = [records.decode_face(r) for r in tf.data.TFRecordDataset(pipeline.list_shards(tmp_path / "out"))]
    for d in decoded:
        assert manifest["classes"][int(d["label"])] == d["identity"].numpy().decode()
        assert d["source"].numpy().decode().startswith(d["identity"].numpy().decode() + "/")
    assert pipeline.scan_shards(tmp_path / "out").num_classes == 3


def test_reruns_are_byte_identical_whatever_the_workers(crop_folder, tmp_path):
    _make(crop_folder, tmp_path / "one", num_workers=1)
    _make(crop_folder, tmp_path / "two", num_workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_an_interrupted_run_finishes_when_re_run(crop_folder, tmp_path, monkeypatch):
    _make(crop_folder, tmp_path / "reference")
    reference = _files(tmp_path / "reference")
    real_write_shard = records.write_shard
    calls = []

    def write_two_then_die(path, serialized):
        if len(calls) == 2:
            # Killed while writing the third shard: a partial temporary file stays behind.
            open(str(path) + ".tmp", "wb").write(b"partial")
            raise KeyboardInterrupt
        calls.append(path)
        return real_write_shard(path, serialized)

    monkeypatch.setattr(records, "write_shard", write_two_then_die)
    with pytest.raises(KeyboardInterrupt):
        _make(crop_folder, tmp_path / "run")
    partial = records.read_manifest(tmp_path / "run")
    assert not partial["complete"] and len(partial["shards"]) == 2
    monkeypatch.setattr(records, "write_shard", real_write_shard)
    _make(crop_folder, tmp_path / "run")
    assert _files(tmp_path / "run") == reference

    # A complete set is verified and left alone; a damaged shard is rewritten.
    mtimes = {name: os.path.getmtime(tmp_path / "run" / name) for name in reference}
    _make(crop_folder, tmp_path / "run")
    assert mtimes == {name: os.path.getmtime(tmp_path / "run" / name) for name in reference}
    (tmp_path / "run" / "train-00001.tfrecord").write_bytes(b"damaged")
    _make(crop_folder, tmp_path / "run")
    assert _files(tmp_path / "run") == reference


def test_changed_settings_need_overwrite(crop_folder, tmp_path):
    _make(crop_folder, tmp_path / "out")
    png = prepare.Settings(detector=None, assume_aligned=True, image_format="png")
    with pytest.raises(ValueError, match="other settings.*image_format"):
        _make(crop_folder, tmp_path / "out", png)
    manifest = _make(crop_folder, tmp_path / "out", png, overwrite=True)
    assert manifest["image_format"] == "png" and manifest["num_records"] == 12
    assert sorted(os.listdir(tmp_path / "out")) == sorted([s["file"] for s in manifest["shards"]] + ["manifest.json"])


def test_list_file_with_unlabelled_faces(crop_folder, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# path label\nann/0.png 17\nann/1.png 17\nbob/0.png 4\n\nbob/1.png -1\n")
    items = shard_writer.read_list_file(listing)
    assert items[-1] == ("bob/1.png", None)
    manifest = shard_writer.make_face_shards(items, crop_folder, tmp_path / "out", CROP_SETTINGS,
                                             num_workers=1, progress=False)
    assert manifest["classes"] == ["17", "4"] and manifest["images_per_class"] == [2, 1]
    assert manifest["num_unlabelled"] == 1 and manifest["num_records"] == 4
    labels = sorted(int(records.decode_face(r)["label"]) for r in tf.data.TFRecordDataset(pipeline.list_shards(tmp_path / "out")))
    assert labels == [-1, 0, 0, 1]
    listing.write_text("just_a_path.png\n")
    with pytest.raises(ValueError, match="line 1"):
        shard_writer.read_list_file(listing)


def test_script_help_runs_both_ways():
    for command in (["-m", "tools.make_shards"], ["tools/make_shards.py"]):
        # absl prints the help and exits with status 1.
        result = subprocess.run([sys.executable, *command, "--helpshort"], cwd=REPO_ROOT,
                                capture_output=True, text=True)
        assert "--assume_aligned" in result.stdout and "--detect_padding" in result.stdout
        assert "--teacher" in result.stdout


def test_bad_detect_padding_is_refused(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.make_shards", "--detect_padding=-3",
                             f"--out_dir={tmp_path / 'o'}"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "flag --detect_padding=-3: -3 is not a non-negative integer" in result.stderr
    # Padding for detection contradicts taking images as aligned crops without detection.
    with pytest.raises(ValueError, match="detect_padding=24 pads images for face detection, but assume_aligned"):
        prepare.FacePreparer(prepare.Settings(detector=None, assume_aligned=True, detect_padding=24))


@pytest.mark.slow
def test_command_line_errors_are_messages(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tools.make_shards", f"--input={tmp_path / 'absent'}", f"--out_dir={tmp_path / 'o'}",
         "--detector=none", "--assume_aligned", "--teacher=none"],
        cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2  # xcos_tf.cli: every user error exits 2
    assert "error: make_shards: --input: no such folder" in result.stderr and "Traceback" not in result.stderr


# === With ../shared: real faces, the teacher, LFW pairs and a .bin ===

@pytest.fixture(scope="module")
def real_shards(shared_dir, tmp_path_factory):
    """Shards of 3 CelebA identities (6 photos each) plus a photo without face, a corrupt file and
    a face too small to use, made with detection, the teacher and 2 worker processes."""
    root = tmp_path_factory.mktemp("celeba")
    identities = sorted((shared_dir / "data" / "celeba_subset" / "images").iterdir())[:3]
    for folder in identities:
        (root / folder.name).mkdir()
        for path in sorted(folder.glob("*.jpg"))[:6]:
            shutil.copy(path, root / folder.name / path.name)
    wild = shared_dir / "data" / "wild"
    index = json.loads((wild / "index.json").read_text())
    first = root / identities[0].name
    shutil.copy(wild / index["no_face_found_by_yunet"][0], first / "zz_no_face.jpg")
    (first / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    photo = align.read_image(wild / "017430.jpg")  # one face, about 35x45 px
    small = cv2.resize(photo, None, fx=0.35, fy=0.35, interpolation=cv2.INTER_AREA)
    (first / "zz_small.png").write_bytes(align.encode_image(small, "png"))
    settings = prepare.Settings(
        detector=str(shared_dir / "models" / "yunet.onnx"),
        teacher={"path": str(shared_dir / "models" / "teacher_mobilefacenet.onnx")},
    )
    out = tmp_path_factory.mktemp("real_shards")
    manifest = _make(root, out, settings, num_workers=2, shard_mb=0.05)
    return out, manifest


def test_real_manifest_lists_counts_and_rejects(real_shards):
    out, manifest = real_shards
    assert manifest["num_classes"] == 3 and manifest["images_per_class"] == [6, 6, 6]
    assert manifest["num_records"] == 18 and manifest["input"]["num_images"] == 21
    reasons = {os.path.basename(r["path"]): r["reason"] for r in manifest["rejects"]}
    assert reasons == {"zz_no_face.jpg": "no_face", "zz_corrupt.jpg": "unreadable", "zz_small.png": "too_small"}
    assert manifest["teacher"]["name"] == "teacher_mobilefacenet.onnx" and manifest["teacher"]["dim"] == 128
    assert manifest["alignment"]["choose"] == "central" and manifest["alignment"]["detector"] == "yunet.onnx"


def test_real_records_hold_unit_teacher_embeddings(real_shards):
    out, manifest = real_shards
    decoded = [records.decode_face(r) for r in tf.data.TFRecordDataset(pipeline.list_shards(out))]
    embeddings = np.stack([d["teacher_embedding"].numpy() for d in decoded])
    flipped = np.stack([d["teacher_embedding_flip"].numpy() for d in decoded])
    labels = np.array([int(d["label"]) for d in decoded])
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    # A mirrored face is the same person: high cosine, but not the same vector.
    flip_cos = np.sum(embeddings * flipped, axis=1)
    assert np.all(flip_cos > 0.6) and np.all(flip_cos < 0.9999)
    cos = embeddings @ embeddings.T
    same = (labels[:, None] == labels[None, :]) & ~np.eye(len(labels), dtype=bool)
    different = labels[:, None] != labels[None, :]
    assert cos[same].mean() > cos[different].mean() + 0.3
    image = tf.io.decode_jpeg(decoded[0]["image_encoded"]).numpy()
    assert image.shape == (112, 112, 3)


def test_real_pair_pipeline_teacher_cos_separates_pairs(real_shards):
    out, _ = real_shards
    batches = [b for b in pipeline.pair_dataset(out, 16, seed=0, shuffle_buffer=32).take(3)]
    same = np.concatenate([(b["label_a"] == b["label_b"]).numpy() for b in batches])
    teacher_cos = np.concatenate([b["teacher_cos"].numpy() for b in batches])
    assert 0.2 < same.mean() < 0.8
    assert teacher_cos[same].mean() > teacher_cos[~same].mean() + 0.3


def test_utkface_crops_align_with_detect_padding(shared_dir, tmp_path):
    # UTKFace: 112x112 crops whose face fills the image, not on the template.
    images = shared_dir / "data" / "utkface_6k" / "images"
    names = ["100_0_0_20170112215240346.jpg", "1_0_0_20170109193052283.jpg"]  # YuNet finds no face in the 2nd
    detector = str(shared_dir / "models" / "yunet.onnx")

    def make(out, **settings):
        manifest = shard_writer.make_face_shards([(name, None) for name in names], images, tmp_path / out,
                                                 prepare.Settings(detector=detector, **settings),
                                                 num_workers=1, progress=False)
        decoded = [records.decode_face(r) for r in tf.data.TFRecordDataset(pipeline.list_shards(tmp_path / out))]
        return manifest, {d["source"].numpy().decode(): d for d in decoded}

    # Without padding they are taken as aligned crops: template landmarks, no rejects.
    manifest, faces = make("plain")
    assert manifest["num_records"] == 2 and "detect_padding" not in manifest["alignment"]
    np.testing.assert_allclose(faces[names[0]]["landmarks"].numpy().reshape(5, 2), align.TEMPLATE_112)
    manifest, faces = make("padded", detect_padding=24)
    assert manifest["alignment"]["detect_padding"] == 24 and manifest["num_records"] == 1
    assert [(r["path"], r["reason"]) for r in manifest["rejects"]] == [(names[1], "no_face")]
    face = align.FaceAligner(detector, detect_padding=24).align(align.read_image(images / names[0]))
    np.testing.assert_array_equal(faces[names[0]]["landmarks"].numpy().reshape(5, 2), face.landmarks)
    assert faces[names[0]]["image_encoded"].numpy() == align.encode_image(face.image, "jpeg", 95)


def test_lfw_pairs_become_pair_shards(shared_dir, tmp_path):
    lines = (shared_dir / "data" / "lfw" / "pairs.txt").read_text().splitlines()
    # Two folds of 2 same + 2 different pairs, taken from folds 0 and 1 of the real file.
    (tmp_path / "pairs.txt").write_text("\n".join(["2\t2"] + lines[1:3] + lines[301:303] + lines[601:603] + lines[901:903]) + "\n")
    settings = prepare.Settings(
        detector=str(shared_dir / "models" / "yunet.onnx"),
        teacher={"path": str(shared_dir / "models" / "teacher_mobilefacenet.onnx")},
    )
    manifest = shard_writer.make_lfw_pair_shards(tmp_path / "pairs.txt", shared_dir / "data" / "lfw" / "images",
                                                 tmp_path / "out", settings, num_workers=1, progress=False)
    assert manifest["kind"] == "pairs" and manifest["num_records"] == 8 and manifest["num_folds"] == 2
    batch = next(iter(pipeline.eval_pair_dataset(tmp_path / "out", 8)))
    assert batch["is_same"].numpy().tolist() == [True, True, False, False] * 2
    assert batch["fold"].numpy().tolist() == [0] * 4 + [1] * 4
    assert batch["name_a"].numpy()[0].decode() == lines[1].split()[0]
    teacher_cos = batch["teacher_cos"].numpy()
    assert teacher_cos[batch["is_same"].numpy()].min() > teacher_cos[~batch["is_same"].numpy()].max()


def test_insightface_bin_becomes_pair_shards(shared_dir, tmp_path):
    people = sorted((shared_dir / "data" / "glint_sample" / "images").iterdir())[:3]
    photos = [sorted(p.glob("*.jpg"))[:4] for p in people]
    images, flags = [], []
    for i in range(10):  # alternate same and different pairs of aligned Glint crops
        same = i % 2 == 0
        a = photos[i % 3][i % 4]
        b = photos[i % 3][(i + 1) % 4] if same else photos[(i + 1) % 3][i % 4]
        images += [a.read_bytes(), b.read_bytes()]
        flags.append(same)
    with open(tmp_path / "tiny.bin", "wb") as f:
        pickle.dump((images, flags), f, protocol=2)
    settings = prepare.Settings(detector=None, teacher={"path": str(shared_dir / "models" / "teacher_mobilefacenet.onnx")})
    manifest = shard_writer.make_bin_pair_shards(tmp_path / "tiny.bin", tmp_path / "out", settings,
                                                 num_workers=1, progress=False, num_folds=5)
    assert manifest["num_records"] == 10 and manifest["num_same"] == 5 and manifest["num_folds"] == 5
    batch = next(iter(pipeline.eval_pair_dataset(tmp_path / "out", 10)))
    assert batch["is_same"].numpy().tolist() == flags
    assert batch["fold"].numpy().tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    is_same = batch["is_same"].numpy()
    assert batch["teacher_cos"].numpy()[is_same].mean() > batch["teacher_cos"].numpy()[~is_same].mean() + 0.3


def _run_make_shards(tmp_path, *args):
    """tools/make_shards as a user runs it into a log file: stderr written to a file."""
    log = tmp_path / "make_shards.log"
    with open(log, "w") as stderr:
        result = subprocess.run(
            [sys.executable, "-m", "tools.make_shards", "--detector=none", "--assume_aligned", "--teacher=none",
             "--num_workers=1", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=300)
    return result, log.read_text()


def test_max_images_takes_a_spread_subset_and_logs_plain_progress(crop_folder, tmp_path):
    result, log = _run_make_shards(tmp_path, f"--input={crop_folder}", f"--out_dir={tmp_path / 'out'}",
                                   "--max_images=5")
    assert result.returncode == 0, log
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["input"]["num_images"] == 5
    # Spread over the sorted list, not its first five (ann's four photos and one of bob's).
    assert len(manifest["classes"]) == 3
    # Progress in a file: plain lines, no carriage return, no ANSI escape, and the final count.
    assert "\r" not in log and "\x1b" not in log
    assert any(line.startswith("faces 5/5 (100%)") for line in log.splitlines()), log


def test_max_pairs_takes_a_spread_subset_of_a_bin(tmp_path):
    rng = np.random.default_rng(0)
    images = [align.encode_image(_smooth_face(rng), "png") for _ in range(40)]
    with open(tmp_path / "tiny.bin", "wb") as f:
        pickle.dump((images, [i % 2 == 0 for i in range(20)]), f, protocol=2)
    result, log = _run_make_shards(tmp_path, f"--bin={tmp_path / 'tiny.bin'}", f"--out_dir={tmp_path / 'out'}",
                                   "--max_pairs=10")
    assert result.returncode == 0, log
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    # 20 pairs in 10 folds of 2: every other pair keeps one pair of each fold.
    assert manifest["num_records"] == 10 and manifest["num_folds"] == 10 and manifest["input"]["max_pairs"] == 10
    assert "\r" not in log and "\x1b" not in log
    wrong, log = _run_make_shards(tmp_path, f"--bin={tmp_path / 'tiny.bin'}", f"--out_dir={tmp_path / 'o2'}",
                                  "--max_images=3")
    assert wrong.returncode == 2 and "--max_images is for face shards" in log
