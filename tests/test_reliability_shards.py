"""make_shards on a full disk (issue 16 item 11, shard side): one clear error naming what was kept,
the finished shards stay, and the same call resumes once there is space. The disk fills up in a
monkeypatched TFRecordWriter (TensorFlow raises ResourceExhaustedError for ENOSPC)."""
import os

import cv2
import numpy as np
import pytest
import tensorflow as tf

from xcos_tf.data import prepare, records, shard_writer

ALIGNED_CROPS = prepare.Settings(detector=None, assume_aligned=True)


def _faces(root, count):
    rng = np.random.default_rng(0)
    items = []
    for i in range(count):
        path = root / "p" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.resize(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8), (112, 112)))
        items.append((f"p/{i}.png", "p"))
    return items


def _disk_full_after(monkeypatch, shards_written):
    """TFRecordWriter that fills the disk while writing shard number `shards_written` + 1."""
    real_writer, opened = tf.io.TFRecordWriter, []

    class FullDiskWriter(real_writer):
        def __init__(self, path):
            super().__init__(path)
            opened.append(path)

        def write(self, record):
            if len(opened) > shards_written:
                raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")
            super().write(record)

    monkeypatch.setattr(records.tf.io, "TFRecordWriter", FullDiskWriter)


def test_disk_full_keeps_finished_shards_and_resumes(tmp_path, monkeypatch):
    items = _faces(tmp_path / "in", 4)
    out = tmp_path / "out"
    make = lambda: shard_writer.make_face_shards(  # noqa: E731
        items, tmp_path / "in", out, ALIGNED_CROPS, shard_mb=1e-6, num_workers=1, progress=False)
    with monkeypatch.context() as patch:
        _disk_full_after(patch, shards_written=2)
        with pytest.raises(records.DiskFullError) as error:
            make()
    message = str(error.value)
    assert "disk full while writing" in message and "train-00002.tfrecord" in message
    assert "kept: the 2 finished shard(s) listed in" in message and "\n" not in message
    assert sorted(os.listdir(out)) == ["manifest.json", "train-00000.tfrecord", "train-00001.tfrecord"]
    assert records.read_manifest(out)["complete"] is False
    manifest = make()  # space again: the same call resumes after the kept shards
    assert manifest["complete"] and manifest["num_records"] == 4 and len(manifest["shards"]) == 4
