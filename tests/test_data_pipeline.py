"""Tests for xcos_tf.data.pipeline on synthetic shards (no ../shared needed)."""
import hashlib
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from xcos_tf.data import align, pipeline, records

SHAPE = (112, 112, 3)
CONTRACT = {
    "image_a": (tf.float32, SHAPE),
    "image_b": (tf.float32, SHAPE),
    "label_a": (tf.int32, ()),
    "label_b": (tf.int32, ()),
    "teacher_cos": (tf.float32, ()),
}


@pytest.fixture
def shards(tmp_path):
    """Three shards of 12 faces, 4 classes, a quarter without identity."""
    out = tmp_path / "shards"
    records.write_synthetic_shards(out, num_shards=3, records_per_shard=12, num_classes=4,
                                   seed=3, embedding_dim=16, unlabelled_fraction=0.25)
    return out


def _batches(dataset, count):
    return [{k: v.numpy() for k, v in batch.items()} for batch in dataset.take(count)]


def test_pair_dataset_follows_the_batch_contract(shards):
    batches = _batches(pipeline.pair_dataset(str(shards), batch_size=6, seed=0, shuffle_buffer=20), 4)
    for batch in batches:
        assert set(batch) == set(CONTRACT)
        for key, (dtype, shape) in CONTRACT.items():
            assert batch[key].dtype == dtype.as_numpy_dtype, key
            assert batch[key].shape == (6, *shape), key
        assert batch["image_a"].min() >= 0 and batch["image_a"].max() <= 255
        assert np.all(batch["label_a"] >= -1) and np.all(batch["label_a"] < 4)
        assert np.all(np.abs(batch["teacher_cos"]) <= 1.0)


@pytest.mark.parametrize("same_fraction", [0.0, 1.0])
def test_same_fraction_extremes(shards, same_fraction):
    batches = _batches(pipeline.pair_dataset(shards, 8, same_fraction=same_fraction, seed=1, shuffle_buffer=20), 5)
    label_a = np.concatenate([b["label_a"] for b in batches])
    label_b = np.concatenate([b["label_b"] for b in batches])
    same = (label_a == label_b) & (label_a >= 0)
    if same_fraction == 1.0:
        # Faces without identity (-1) never form same pairs.
        assert np.all(same) and np.all(label_a >= 0)
    else:
        assert not np.any(same)


def test_same_fraction_half(shards):
    batches = _batches(pipeline.pair_dataset(shards, 32, seed=2, shuffle_buffer=20), 4)
    same = np.concatenate([(b["label_a"] == b["label_b"]) & (b["label_a"] >= 0) for b in batches])
    assert 0.35 < same.mean() < 0.65, same.mean()


def test_teacher_cos_is_the_dot_of_the_stored_embeddings(shards):
    # Without augmentation each decoded image identifies its record, and so its embedding.
    embedding_of = {}
    for serialized in tf.data.TFRecordDataset(pipeline.list_shards(shards)):
        decoded = records.decode_face(serialized)
        pixels = pipeline.decode_image(decoded["image_encoded"]).numpy()
        embedding_of[hashlib.sha1(pixels.tobytes()).hexdigest()] = decoded["teacher_embedding"].numpy()
    batch = _batches(pipeline.pair_dataset(shards, 16, augment=False, seed=3, shuffle_buffer=20), 1)[0]
    for image_a, image_b, teacher_cos in zip(batch["image_a"], batch["image_b"], batch["teacher_cos"]):
        a = embedding_of[hashlib.sha1(image_a.tobytes()).hexdigest()]
        b = embedding_of[hashlib.sha1(image_b.tobytes()).hexdigest()]
        np.testing.assert_allclose(teacher_cos, np.dot(a, b), atol=1e-5)


def test_flip_switches_to_the_flipped_teacher_embedding():
    image = tf.concat([tf.zeros((112, 56, 3)), tf.fill((112, 56, 3), 255.0)], axis=1)
    embedding, embedding_flip = tf.constant([1.0, 0.0]), tf.constant([0.0, 1.0])
    flips = []
    for index in range(12):
        augmented, chosen = pipeline._augment(image, embedding, embedding_flip, tf.constant([5, index], tf.int64))
        flipped = augmented[:, :56].numpy().mean() > augmented[:, 56:].numpy().mean()
        np.testing.assert_array_equal(chosen.numpy(), [0.0, 1.0] if flipped else [1.0, 0.0])
        flips.append(flipped)
        assert augmented.numpy().min() >= 0 and augmented.numpy().max() <= 255
    assert 0 < sum(flips) < 12


def test_deterministic_mode_repeats_batches(shards):
    def first_batches(seed):
        return _batches(pipeline.pair_dataset(shards, 8, seed=seed, deterministic=True, shuffle_buffer=20), 1)

    a, b, c = first_batches(7), first_batches(7), first_batches(8)
    for x, y in zip(a, b):
        for key in CONTRACT:
            np.testing.assert_array_equal(x[key], y[key])
    assert any(not np.array_equal(x["image_a"], z["image_a"]) for x, z in zip(a, c))
    with pytest.raises(ValueError, match="needs a seed"):
        pipeline.pair_dataset(shards, 8, deterministic=True)


def test_empty_glob_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "nothing-*.tfrecord")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        pipeline.pair_dataset(pattern, 4)


def _record_offsets(path):
    """Byte offset where each record starts (TFRecord framing: 8 length, 4 crc, data, 4 crc)."""
    data, offsets, position = open(path, "rb").read(), [], 0
    while position < len(data):
        offsets.append(position)
        position += 16 + int.from_bytes(data[position:position + 8], "little")
    return offsets


@pytest.mark.parametrize("damage", ["truncate_mid_record", "flip_a_byte", "cut_at_record_boundary"])
def test_corrupt_shard_names_file_and_record(shards, damage):
    victim = pipeline.list_shards(shards)[1]
    data = bytearray(open(victim, "rb").read())
    offsets = _record_offsets(victim)
    if damage == "truncate_mid_record":
        data = data[:offsets[7] + 30]
    elif damage == "flip_a_byte":
        data[offsets[7] + 40] ^= 0xFF
    else:
        data = data[:offsets[7]]
    open(victim, "wb").write(bytes(data))
    with pytest.raises(pipeline.CorruptShardError, match=r"synthetic-00001.tfrecord: record 7 ") as error:
        pipeline.pair_dataset(shards, 4)
    assert error.value.path == victim and error.value.record_index == 7

    scan = pipeline.scan_shards(shards, skip_corrupt=True)
    assert scan.corrupt == [(victim, 7)] and scan.counts == [12, 7, 12]
    if damage == "truncate_mid_record":
        batch = _batches(pipeline.pair_dataset(shards, 4, skip_corrupt=True, seed=0, shuffle_buffer=8), 1)[0]
        assert batch["image_a"].shape == (4, *SHAPE)


def test_labels_outside_the_classes_are_refused(shards):
    with pytest.raises(ValueError, match=r"record \d+: label 3 is outside 0..2 \(num_classes=3\)"):
        pipeline.pair_dataset(shards, 4, num_classes=3)


def test_shards_without_teacher_are_refused(tmp_path):
    face = align.encode_image(np.zeros(SHAPE, np.uint8))
    records.write_shard(tmp_path / "plain.tfrecord", [
        records.encode_face_example(face, "jpeg", i % 2, "x", "x.jpg", align.TEMPLATE_112) for i in range(4)
    ])
    with pytest.raises(ValueError, match="no teacher embeddings.*--teacher"):
        pipeline.pair_dataset(tmp_path, 2)


def test_shards_from_separate_runs_are_refused_without_num_classes(tmp_path):
    records.write_synthetic_shards(tmp_path / "one", 1, 4, 2)
    records.write_synthetic_shards(tmp_path / "two", 1, 4, 2)
    with pytest.raises(ValueError, match="separate label spaces"):
        pipeline.pair_dataset([tmp_path / "one", tmp_path / "two"], 2)


def test_an_unlabelled_run_combines_with_one_labelled_run(tmp_path):
    # A make_shards --unlabelled run (e.g. UTKFace) has no label space that could clash.
    records.write_synthetic_shards(tmp_path / "labelled", 1, 8, 3, seed=1)
    records.write_synthetic_shards(tmp_path / "unlabelled", 1, 6, 1, seed=2, unlabelled_fraction=1.0)
    scan = pipeline.scan_shards([tmp_path / "labelled", tmp_path / "unlabelled"])
    assert scan.num_classes == 3 and scan.counts == [8, 6]
    assert sorted(set(scan.labels.tolist())) == [-1, 0, 1, 2] and np.sum(scan.labels == -1) == 6
    batch = _batches(pipeline.pair_dataset([tmp_path / "labelled", tmp_path / "unlabelled"], 4, seed=0,
                                           shuffle_buffer=8), 1)[0]
    assert batch["label_a"].shape == (4,)
    assert pipeline.scan_shards(tmp_path / "unlabelled").num_classes == 0
    # Two labelled runs still have separate label spaces, with or without an unlabelled one.
    records.write_synthetic_shards(tmp_path / "labelled_too", 1, 4, 2, seed=3)
    runs = [tmp_path / "labelled", tmp_path / "unlabelled", tmp_path / "labelled_too"]
    with pytest.raises(ValueError, match="separate label spaces"):
        pipeline.scan_shards(runs)
    # Labelled shards without a manifest: their labels give num_classes; still one labelled run only.
    os.remove(tmp_path / "labelled" / "manifest.json")
    assert pipeline.scan_shards(runs[:2]).num_classes == 3
    with pytest.raises(ValueError, match="separate label spaces"):
        pipeline.scan_shards(runs)


def test_input_context_shards_by_file_and_batches_per_replica(shards):
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=4)
    scan = pipeline.scan_shards(shards)
    sharded = pipeline._record_dataset(scan, context, shuffle=False, seed=None, deterministic=True)
    expected = [r.numpy() for r in tf.data.TFRecordDataset(scan.files[1::2])]
    assert [r.numpy() for r in sharded] == expected
    batch = _batches(pipeline.pair_dataset(shards, 8, input_context=context, seed=0, shuffle_buffer=8), 1)[0]
    assert batch["label_a"].shape == (2,)  # 8 pairs over 4 replicas
    too_many = tf.distribute.InputContext(num_input_pipelines=4, input_pipeline_id=0, num_replicas_in_sync=4)
    with pytest.raises(ValueError, match=r"3 file\(s\) in .* cannot be split"):
        pipeline.pair_dataset(shards, 8, input_context=too_many)


def test_eval_pair_dataset_keeps_order_and_last_batch(tmp_path):
    rng = np.random.default_rng(0)
    serialized = []
    for i in range(5):
        a, b = (rng.integers(0, 256, SHAPE, dtype=np.uint8) for _ in range(2))
        serialized.append(records.encode_pair_example(
            align.encode_image(a, "png"), align.encode_image(b, "png"), "png", i % 2 == 0, i // 2,
            f"A{i}", f"B{i}", f"a{i}.jpg", f"b{i}.jpg", [1.0, 0.0], [np.cos(i), np.sin(i)]))
    records.write_shard(tmp_path / "pairs-00000.tfrecord", serialized)
    batches = _batches(pipeline.eval_pair_dataset(tmp_path, 2), 10)
    assert [len(b["is_same"]) for b in batches] == [2, 2, 1]
    assert np.concatenate([b["is_same"] for b in batches]).tolist() == [True, False, True, False, True]
    assert np.concatenate([b["fold"] for b in batches]).tolist() == [0, 0, 1, 1, 2]
    np.testing.assert_allclose(np.concatenate([b["teacher_cos"] for b in batches]), np.cos(np.arange(5)), atol=1e-6)
    assert batches[2]["name_b"].tolist() == [b"B4"]
    assert batches[0]["image_a"].dtype == np.float32 and batches[0]["image_a"].shape == (2, *SHAPE)


def test_synthetic_pair_dataset_contract():
    batch = _batches(pipeline.synthetic_pair_dataset(4, num_classes=5, seed=1, same_fraction=1.0), 1)[0]
    for key, (dtype, shape) in CONTRACT.items():
        assert batch[key].dtype == dtype.as_numpy_dtype and batch[key].shape == (4, *shape)
    np.testing.assert_array_equal(batch["label_a"], batch["label_b"])


def test_list_shards_accepts_folders_and_lists(shards, tmp_path):
    files = pipeline.list_shards([shards, str(shards / "synthetic-00000.tfrecord")])
    assert [os.path.basename(f) for f in files] == [f"synthetic-0000{i}.tfrecord" for i in range(3)]
    shutil.copy(files[0], tmp_path / "copy.tfrecord")
    assert pipeline.list_shards(tmp_path / "*.tfrecord") == [str(tmp_path / "copy.tfrecord")]
