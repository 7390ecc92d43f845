"""tools/context_ablation on tiny data: a 112x112 tiny ONNX face model (GDConv tail, 4x4 cells),
synthetic training faces, and pair shards whose teacher embeddings are that model's own, centred
on the training faces (the tiny random model's raw embeddings share a large common offset that
a real face model's do not): at a large context every cell is the whole face's centred
embedding, so xCos must then score exactly as that teacher does."""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import onnx
import pytest

import tiny_onnx_tails
from tiny_onnx_tails import FACE_SHAPE as IMAGE_SHAPE, tiny_face_model_112
from training_testing import shard_faces_and_mirrors
from xcos_tf import backbones
from xcos_tf.data import align, features, records

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
ROW = re.compile(r"^(\S+)\s+(\d+)\s+(\S+)\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)\s+([\d.]+)%$")


def _faces(rng, count):
    coarse = rng.integers(0, 256, size=(count, 7, 7, 3), dtype=np.uint8)
    return np.stack([cv2.resize(face, IMAGE_SHAPE[:2], interpolation=cv2.INTER_LINEAR) for face in coarse])


def _write_pair_shards(out_dir, model, mean_embedding, num_people=12, num_pairs=60, noise=40):
    """Same-person pairs: a face and a noisy copy (noise 40 leaves the teacher at 85 %, so that
    "as accurate as the teacher" is not just 100 % = 100 %); different: two people's faces.
    The teacher embeddings are the model's minus `mean_embedding`."""
    rng = np.random.default_rng(0)
    people = _faces(rng, num_people)
    faces_a, faces_b, is_same = [], [], []
    for i in range(num_pairs):
        a = i % num_people
        if i % 2 == 0:
            b_face = np.clip(people[a] + rng.normal(0, noise, IMAGE_SHAPE), 0, 255).astype(np.uint8)
        else:
            b_face = people[(a + 1 + i // num_people) % num_people]
        faces_a.append(people[a])
        faces_b.append(b_face)
        is_same.append(i % 2 == 0)
    (teacher_a,) = tiny_onnx_tails.run_onnx(model, np.stack(faces_a).astype("float32"))
    (teacher_b,) = tiny_onnx_tails.run_onnx(model, np.stack(faces_b).astype("float32"))
    # Unit length, as make_shards stores them (the pair pipeline's teacher_cos is their dot product).
    teacher_a, teacher_b = (records._unit_rows(t - mean_embedding) for t in (teacher_a, teacher_b))
    serialized = [
        records.encode_pair_example(align.encode_image(a, "png"), align.encode_image(b, "png"), "png", same,
                                    i % 10, f"a{i}", f"b{i}", "a.png", "b.png", ta, tb)
        for i, (a, b, same, ta, tb) in enumerate(
            zip(faces_a, faces_b, is_same, teacher_a, teacher_b))
    ]
    os.makedirs(out_dir)
    records.write_shard(os.path.join(out_dir, records.shard_name("pairs", 0)), serialized)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    model = tiny_face_model_112()
    onnx.save(model, str(root / "tiny.onnx"))
    records.write_synthetic_shards(str(root / "faces"), num_shards=2, records_per_shard=12, num_classes=3,
                                   image_shape=IMAGE_SHAPE, embedding_dim=tiny_onnx_tails.EMBEDDING)
    # The tail is linear: the sum of the head's per-cell centres is the mean embedding of the
    # centring faces (every training face and its mirror image with --centre_faces=24).
    (embeddings,) = tiny_onnx_tails.run_onnx(model, shard_faces_and_mirrors(root / "faces"))
    _write_pair_shards(root / "pairs", model, embeddings.mean(axis=0))
    return root


def _run(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "tools.context_ablation", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600, env=env)


def test_table_of_contexts_and_attentions(data):
    result = _run(f"--teacher={data / 'tiny.onnx'}", f"--train_shards={data / 'faces' / '*.tfrecord'}",
                  f"--pairs={data / 'pairs' / '*.tfrecord'}", "--contexts=0,0.2,1000", "--centre_faces=24")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "CPU" in lines[0]
    assert lines[1].startswith("versions: ") and "tensorflow" in lines[1] and "keras" in lines[1]
    header = next(line for line in lines if line.startswith("pairs ") and "context" in line)
    assert header.split()[2:] == ["context", "uniform", "prior", "teacher", "spread", "dark", "band"]
    rows = [ROW.match(line) for line in lines]
    rows = {float(m.group(3)): m for m in rows if m}
    assert sorted(rows) == [0.0, 0.2, 1000.0]
    assert {(m.group(1), int(m.group(2))) for m in rows.values()} == {("pairs", 60)}  # the set's folder, its pairs
    teacher = {float(m.group(6)) for m in rows.values()}
    assert len(teacher) == 1  # one teacher figure per pair set
    # Every cell sees the whole face: the cos_map is flat and the score is the (centred) teacher's cosine.
    large = rows[1000.0]
    assert float(large.group(7)) < 1e-3 < float(rows[0.0].group(7))
    assert float(large.group(4)) == float(large.group(5)) == teacher.pop()
    for m in rows.values():
        assert 0 <= float(m.group(8)) <= 100
    # The band covers cell row 1 of 4 at least half (rows 40..61 of 28-pixel cells): chance 4/16.
    assert "(chance 25.00%)" in result.stdout


def test_max_pairs_band_pairs_and_the_trainers_feature_cache(data, tmp_path):
    # The trainer's layout: SHARDS_ROOT/faces/ and its cache in SHARDS_ROOT/feature_cache/.
    shutil.copytree(data / "faces", tmp_path / "faces")
    body = backbones.from_onnx(str(data / "tiny.onnx"), input_shape=IMAGE_SHAPE)
    features.write_feature_shards(body, str(tmp_path / "faces"), str(tmp_path / "feature_cache" / "00_faces"),
                                  progress=False)
    result = _run(f"--teacher={data / 'tiny.onnx'}", f"--train_shards={tmp_path / 'faces' / '*.tfrecord'}",
                  "--contexts=0", "--centre_faces=4", f"--pairs={data / 'pairs' / '*.tfrecord'}", "--max_pairs=20",
                  "--band_pairs=3")
    assert result.returncode == 0, result.stderr
    assert [int(m.group(2)) for m in map(ROW.match, result.stdout.splitlines()) if m] == [20]
    assert f"(maps from {tmp_path / 'feature_cache' / '00_faces'})" in result.stdout
    assert "same-person pairs (pairs 3)" in result.stdout


def test_bad_input_exits_2_with_one_line(data):
    args = [f"--teacher={data / 'tiny.onnx'}", f"--train_shards={data / 'faces' / '*.tfrecord'}", "--contexts=0",
            "--centre_faces=4"]
    result = _run(*args, f"--pairs={data / 'faces' / '*.tfrecord'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: ") and "holds face records, not pair records" in result.stderr
    result = _run(*args[:-2], "--contexts=0,x", f"--pairs={data / 'pairs' / '*.tfrecord'}")
    assert result.returncode == 2 and "error: --contexts must be numbers" in result.stderr
