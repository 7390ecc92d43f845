"""The TFRecord formats: face records (training) and pair records (evaluation), and shard files.

A shard set is a folder of `*.tfrecord` files plus `manifest.json` (see `tools/make_shards.py`).

Face record (`tf.train.Example`), keys in `FACE_KEYS`:
    image/encoded    bytes   the aligned 112x112 RGB face, JPEG or PNG
    image/format     bytes   b"jpeg" or b"png"
    image/label      int64   0..C-1, or -1 (UNLABELLED: a face without identity)
    image/identity   bytes   identity name ("" when unlabelled)
    image/source     bytes   source image path, relative to the input root
    image/landmarks  float   10 values: the 5 (x, y) landmarks in the source image
    teacher/embedding       float  D values, L2-normalised teacher embedding (optional)
    teacher/embedding_flip  float  D values, the same for the horizontally flipped face (optional)

Pair record, keys in `PAIR_KEYS`: `pair/image_a`, `pair/image_b` (encoded aligned faces),
`pair/format`, `pair/is_same` (int64 0/1), `pair/fold` (int64), `pair/name_a`, `pair/name_b`,
`pair/source_a`, `pair/source_b`, and optional `pair/teacher_a`, `pair/teacher_b` embeddings.

The decoders turn serialized bytes into a dict of raw tensors (optional fields default to
empty); decoding the image and augmenting belong to the parsers in `pipeline.py`.
"""
import errno
import hashlib
import json
import os

import cv2
import numpy as np
import tensorflow as tf

from xcos_tf.data import align

UNLABELLED = -1
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".tfrecord"

FACE_KEYS = {
    "image_encoded": "image/encoded",
    "image_format": "image/format",
    "label": "image/label",
    "identity": "image/identity",
    "source": "image/source",
    "landmarks": "image/landmarks",
    "teacher_embedding": "teacher/embedding",
    "teacher_embedding_flip": "teacher/embedding_flip",
}
PAIR_KEYS = {
    "image_a": "pair/image_a",
    "image_b": "pair/image_b",
    "image_format": "pair/format",
    "is_same": "pair/is_same",
    "fold": "pair/fold",
    "name_a": "pair/name_a",
    "name_b": "pair/name_b",
    "source_a": "pair/source_a",
    "source_b": "pair/source_b",
    "teacher_a": "pair/teacher_a",
    "teacher_b": "pair/teacher_b",
}


def _bytes(value):
    if isinstance(value, str):
        value = value.encode("utf-8")
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def _floats(values):
    values = np.asarray(values, np.float32).reshape(-1)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"Refusing to write NaN or infinite values: {values[:10]} ...")
    return tf.train.Feature(float_list=tf.train.FloatList(value=values.tolist()))


def _serialize(feature):
    # deterministic=True sorts the feature map: the same record gives the same bytes in every
    # run, which makes shards byte-identical across re-runs.
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


def encode_face_example(image_encoded, image_format, label, identity, source, landmarks,
                        teacher_embedding=None, teacher_embedding_flip=None):
    """One face record as serialized `tf.train.Example` bytes."""
    if label < UNLABELLED:
        raise ValueError(f"label must be >= 0, or -1 for no identity. Received: label={label}")
    feature = {
        FACE_KEYS["image_encoded"]: _bytes(image_encoded),
        FACE_KEYS["image_format"]: _bytes(image_format),
        FACE_KEYS["label"]: _int(label),
        FACE_KEYS["identity"]: _bytes(identity),
        FACE_KEYS["source"]: _bytes(source),
        FACE_KEYS["landmarks"]: _floats(np.reshape(landmarks, 10)),
    }
    if teacher_embedding is not None:
        feature[FACE_KEYS["teacher_embedding"]] = _floats(teacher_embedding)
        feature[FACE_KEYS["teacher_embedding_flip"]] = _floats(
            teacher_embedding if teacher_embedding_flip is None else teacher_embedding_flip
        )
    return _serialize(feature)


def encode_pair_example(image_a, image_b, image_format, is_same, fold, name_a, name_b,
                        source_a, source_b, teacher_a=None, teacher_b=None):
    """One evaluation pair as serialized `tf.train.Example` bytes."""
    feature = {
        PAIR_KEYS["image_a"]: _bytes(image_a),
        PAIR_KEYS["image_b"]: _bytes(image_b),
        PAIR_KEYS["image_format"]: _bytes(image_format),
        PAIR_KEYS["is_same"]: _int(bool(is_same)),
        PAIR_KEYS["fold"]: _int(fold),
        PAIR_KEYS["name_a"]: _bytes(name_a),
        PAIR_KEYS["name_b"]: _bytes(name_b),
        PAIR_KEYS["source_a"]: _bytes(source_a),
        PAIR_KEYS["source_b"]: _bytes(source_b),
    }
    if teacher_a is not None and teacher_b is not None:
        feature[PAIR_KEYS["teacher_a"]] = _floats(teacher_a)
        feature[PAIR_KEYS["teacher_b"]] = _floats(teacher_b)
    return _serialize(feature)


def _float_list():
    return tf.io.FixedLenSequenceFeature([], tf.float32, allow_missing=True, default_value=0.0)


_FACE_FEATURES = {
    FACE_KEYS["image_encoded"]: tf.io.FixedLenFeature([], tf.string),
    FACE_KEYS["image_format"]: tf.io.FixedLenFeature([], tf.string, default_value="jpeg"),
    FACE_KEYS["label"]: tf.io.FixedLenFeature([], tf.int64, default_value=UNLABELLED),
    FACE_KEYS["identity"]: tf.io.FixedLenFeature([], tf.string, default_value=""),
    FACE_KEYS["source"]: tf.io.FixedLenFeature([], tf.string, default_value=""),
    FACE_KEYS["landmarks"]: _float_list(),
    FACE_KEYS["teacher_embedding"]: _float_list(),
    FACE_KEYS["teacher_embedding_flip"]: _float_list(),
}
_PAIR_FEATURES = {
    PAIR_KEYS["image_a"]: tf.io.FixedLenFeature([], tf.string),
    PAIR_KEYS["image_b"]: tf.io.FixedLenFeature([], tf.string),
    PAIR_KEYS["image_format"]: tf.io.FixedLenFeature([], tf.string, default_value="jpeg"),
    PAIR_KEYS["is_same"]: tf.io.FixedLenFeature([], tf.int64),
    PAIR_KEYS["fold"]: tf.io.FixedLenFeature([], tf.int64, default_value=0),
    PAIR_KEYS["name_a"]: tf.io.FixedLenFeature([], tf.string, default_value=""),
    PAIR_KEYS["name_b"]: tf.io.FixedLenFeature([], tf.string, default_value=""),
    PAIR_KEYS["source_a"]: tf.io.FixedLenFeature([], tf.string, default_value=""),
    PAIR_KEYS["source_b"]: tf.io.FixedLenFeature([], tf.string, default_value=""),
    PAIR_KEYS["teacher_a"]: _float_list(),
    PAIR_KEYS["teacher_b"]: _float_list(),
}


def _decode(serialized, features, keys):
    parsed = tf.io.parse_single_example(serialized, features)
    return {name: parsed[key] for name, key in keys.items()}


def decode_face(serialized):
    """Serialized face record -> dict of raw tensors keyed like `FACE_KEYS` (label int64;
    missing teacher embeddings come back as empty float vectors)."""
    return _decode(serialized, _FACE_FEATURES, FACE_KEYS)


def decode_pair(serialized):
    """Serialized pair record -> dict of raw tensors keyed like `PAIR_KEYS`."""
    return _decode(serialized, _PAIR_FEATURES, PAIR_KEYS)


def record_kind(path):
    """What the first record of a shard file is: "faces", "pairs", "feature maps" (a feature
    cache, `xcos_tf.data.features`), "unknown", or None (empty or unreadable: the scan says why)."""
    try:
        serialized = next(iter(tf.data.TFRecordDataset(path).take(1)), None)
        if serialized is None:
            return None
        keys = set(tf.train.Example.FromString(serialized.numpy()).features.feature)
    except (tf.errors.OpError, ValueError):
        return None
    if PAIR_KEYS["image_a"] in keys:
        return "pairs"
    if FACE_KEYS["image_encoded"] in keys:
        return "faces"
    if any(key.startswith("feature/") for key in keys):
        return "feature maps"
    return "unknown"


def check_record_kind(path, kind):
    """Raises `ValueError` naming what the shard file at `path` holds unless it is `kind`
    ("faces" or "pairs") records."""
    found = record_kind(path)
    if found not in (None, kind):
        noun = {"faces": "face records", "pairs": "pair records", "feature maps": "cached feature maps (a feature cache)",
                "unknown": "records of an unknown kind"}
        raise ValueError(f"{path} holds {noun[found]}, not {noun[kind]}: give "
                         f"{'training face' if kind == 'faces' else 'evaluation pair'} shards (tools/make_shards.py)")


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class DiskFullError(OSError):
    """No space left for a shard or a manifest; the half-written temporary file is removed."""

    def __init__(self, message):
        super().__init__(errno.ENOSPC, message)


def _remove_partial(temporary):
    try:
        os.remove(temporary)
    except OSError:
        pass


def write_shard(path, serialized_records):
    """Writes records to `path` through a temporary name and an atomic rename, so a killed
    run never leaves a half shard under the final name. Returns its manifest entry.
    Raises `DiskFullError` when the disk fills up (TensorFlow's ResourceExhaustedError)."""
    path = os.fspath(path)
    temporary = path + ".tmp"
    count = 0
    try:
        with tf.io.TFRecordWriter(temporary) as writer:
            for record in serialized_records:
                writer.write(record)
                count += 1
    except tf.errors.ResourceExhaustedError:
        _remove_partial(temporary)
        raise DiskFullError(f"disk full while writing {path} (its temporary file is removed)") from None
    os.replace(temporary, path)
    return {
        "file": os.path.basename(path),
        "records": count,
        "bytes": os.path.getsize(path),
        "sha256": sha256_file(path),
    }


def shard_name(prefix, index):
    return f"{prefix}-{index:05d}{SHARD_SUFFIX}"


def write_json_atomic(path, obj):
    temporary = os.fspath(path) + ".tmp"
    try:
        with open(temporary, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        _remove_partial(temporary)
        raise DiskFullError(f"disk full while writing {path} (its temporary file is removed)") from None
    os.replace(temporary, path)


def read_manifest(shard_dir):
    """The manifest.json of a shard folder, or None when there is none."""
    path = os.path.join(os.fspath(shard_dir), MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def _smooth_random_face(rng, image_shape):
    # Upsampled 7x7 noise: compresses like a photo (small JPEG) and differs per record.
    coarse = rng.integers(0, 256, size=(7, 7, image_shape[2]), dtype=np.uint8)
    return cv2.resize(coarse, image_shape[1::-1], interpolation=cv2.INTER_LINEAR)


def _unit_rows(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def write_synthetic_shards(out_dir, num_shards=2, records_per_shard=16, num_classes=4,
                           image_shape=(112, 112, 3), seed=0, embedding_dim=128,
                           image_format="jpeg", unlabelled_fraction=0.0):
    """Tiny face shards of random images, labels and unit teacher embeddings, with a manifest.

    For tests and smoke runs of modules downstream of the data (no ../shared needed). Labels
    cycle through 0..num_classes-1 so every class has several faces; a share
    `unlabelled_fraction` of the records gets label -1. Returns the list of shard paths.
    """
    if num_classes < 1 or num_shards < 1 or records_per_shard < 1:
        raise ValueError(
            "num_shards, records_per_shard and num_classes must be >= 1. Received: "
            f"{num_shards}, {records_per_shard}, {num_classes}"
        )
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = [f"class_{i:04d}" for i in range(num_classes)]
    entries, paths = [], []
    images_per_class = [0] * num_classes
    num_unlabelled = 0
    for shard in range(num_shards):
        records = []
        for i in range(records_per_shard):
            index = shard * records_per_shard + i
            label = UNLABELLED if rng.random() < unlabelled_fraction else index % num_classes
            if label == UNLABELLED:
                num_unlabelled += 1
            else:
                images_per_class[label] += 1
            embedding = _unit_rows(rng.normal(size=embedding_dim))
            flipped = _unit_rows(embedding + 0.1 * rng.normal(size=embedding_dim))
            records.append(encode_face_example(
                align.encode_image(_smooth_random_face(rng, image_shape), image_format),
                image_format,
                label,
                "" if label == UNLABELLED else classes[label],
                f"synthetic/{index:06d}.png",
                align.TEMPLATE_112,
                embedding,
                flipped,
            ))
        path = os.path.join(out_dir, shard_name("synthetic", shard))
        entries.append(write_shard(path, records))
        paths.append(path)
    write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), {
        "kind": "faces",
        "num_classes": num_classes,
        "classes": classes,
        "images_per_class": images_per_class,
        "num_records": num_shards * records_per_shard,
        "num_unlabelled": num_unlabelled,
        "shards": entries,
        "teacher": {"name": "synthetic", "dim": embedding_dim},
        "image_format": image_format,
    })
    return paths
