"""tf.data input pipelines over face and pair shards, and a synthetic source.

`pair_dataset` yields training batches in the project's batch contract:
    {"image_a", "image_b": float32 [B, 112, 112, 3] RGB 0..255,
     "label_a", "label_b": int32 [B] (0..C-1, or -1 = no identity),
     "teacher_cos": float32 [B]}
`eval_pair_dataset` yields evaluation pairs in order with `is_same` and `fold`.

Before a dataset is built, `scan_shards` reads every shard once (C++ speed, labels only): a
truncated or corrupt shard, a label outside 0..C-1, or a missing teacher embedding is reported
with the file and record index here, not as a TensorFlow error deep inside training.

Example:

```python
dataset = pair_dataset("shards/train-*.tfrecord", batch_size=64, seed=0)
batch = next(iter(dataset))
```
"""
import dataclasses
import glob
import os
import random

import numpy as np
import tensorflow as tf
from absl import logging

from xcos_tf.data import records

IMAGE_SHAPE = (112, 112, 3)
# Mild photometric jitter: pixel units for brightness, a factor range for contrast.
BRIGHTNESS_DELTA = 16.0
CONTRAST_RANGE = (0.8, 1.2)
_SCAN_BATCH = 1024


class CorruptShardError(ValueError):
    """A shard file whose record `record_index` is truncated or fails its checksum."""

    def __init__(self, path, record_index, detail):
        self.path = path
        self.record_index = record_index
        super().__init__(
            f"{path}: record {record_index} is truncated or corrupt ({detail}). Re-create the "
            "shard (tools/make_shards.py resumes and rewrites it) or pass skip_corrupt=True."
        )


def list_shards(file_patterns):
    """Sorted shard files matching a pattern or list of patterns; raises on an empty glob."""
    if isinstance(file_patterns, (str, os.PathLike)):
        file_patterns = [file_patterns]
    files = []
    for pattern in file_patterns:
        pattern = os.fspath(pattern)
        if os.path.isdir(pattern):
            pattern = os.path.join(pattern, "*" + records.SHARD_SUFFIX)
        matched = sorted(glob.glob(pattern))
        if not matched:
            raise FileNotFoundError(f"No shard files match {pattern!r}")
        files.extend(matched)
    return sorted(set(files))


@dataclasses.dataclass
class ShardScan:
    """What `scan_shards` found.

    Attributes:
        files: the shard files, sorted.
        counts: readable records per file (shorter than the file when it was skipped as corrupt).
        labels: int64 [total records] (face shards; empty for pair shards), in file order.
        teacher_dim: teacher embedding length of every record (0: none in these shards).
        num_classes: C; face labels are in 0..C-1 or -1.
        corrupt: (file, first bad record index) for each shard skipped as corrupt.
    """

    files: list
    counts: list
    labels: np.ndarray
    teacher_dim: int
    num_classes: int
    corrupt: list


def _scan_features(kind):
    if kind == "faces":
        return {
            records.FACE_KEYS["label"]: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
            records.FACE_KEYS["teacher_embedding"]: tf.io.RaggedFeature(tf.float32),
        }
    return {records.PAIR_KEYS["teacher_a"]: tf.io.RaggedFeature(tf.float32)}


def _first_bad_record(path, start, kind):
    """Index of the first record from `start` on that cannot be read or parsed."""
    features = _scan_features(kind)
    iterator = iter(tf.data.TFRecordDataset(path).skip(start))
    index = start
    while True:
        try:
            serialized = next(iterator)
            tf.io.parse_single_example(serialized, features)
        except StopIteration:
            return index, "record count differs from the manifest"
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
            return index, e.message.splitlines()[0]
        index += 1


def _teacher_key(kind):
    return records.FACE_KEYS["teacher_embedding"] if kind == "faces" else records.PAIR_KEYS["teacher_a"]


def _scan_file(path, kind, limit=None):
    """(labels, teacher lengths) of every record (of the first `limit`), or CorruptShardError
    at the first bad one."""
    features = _scan_features(kind)
    dataset = tf.data.TFRecordDataset(path)
    if limit is not None:
        dataset = dataset.take(limit)
    dataset = dataset.batch(_SCAN_BATCH).map(lambda serialized: tf.io.parse_example(serialized, features))
    labels, teacher_dims = [], []
    try:
        for parsed in dataset:
            if kind == "faces":
                labels.append(parsed[records.FACE_KEYS["label"]].numpy())
            teacher_dims.append(parsed[_teacher_key(kind)].row_lengths().numpy())
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError):
        # The batched pass only says which batch failed: find the exact record.
        good = sum(len(d) for d in teacher_dims)
        index, detail = _first_bad_record(path, good, kind)
        raise CorruptShardError(path, index, detail) from None
    return _concat(labels), _concat(teacher_dims)


def _concat(parts):
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _manifests_for(files):
    """The manifests of the folders holding `files`: {folder: manifest or None}."""
    return {folder: records.read_manifest(folder) for folder in sorted({os.path.dirname(f) for f in files})}


def _is_unlabelled_run(manifest):
    """A make_shards --unlabelled run (faces without identities): it has no label space to clash."""
    return bool(manifest) and manifest.get("kind") == "faces" and (
        manifest.get("num_unlabelled", 0) >= manifest.get("num_records", 0))


def _num_classes_from_manifests(manifests, labels):
    label_spaces = {folder: m for folder, m in manifests.items() if not _is_unlabelled_run(m)}
    labelled = [m for m in label_spaces.values() if m and m.get("kind") == "faces"]
    if len(label_spaces) > 1 and labelled:
        raise ValueError(
            f"Shards from several make_shards runs ({sorted(label_spaces)}) have separate label "
            "spaces. Write all training sources in one run (a list file with one label per "
            "identity), or pass num_classes when the labels are known to be shared."
        )
    if labelled:
        return int(labelled[0]["num_classes"])
    # Unlabelled runs alone (all labels -1) give 0; with labelled shards without a manifest,
    # those shards' labels count.
    return int(labels.max()) + 1 if len(labels) else 0


def scan_shards(file_patterns, kind="faces", skip_corrupt=False, num_classes=None):
    """Reads every record's label and teacher length once and checks the shards: records of
    another kind (face records given as pairs, a feature cache) raise a `ValueError` naming it.

    Args:
        file_patterns: str or list, glob patterns or shard folders.
        kind: `"faces"` (training shards) or `"pairs"` (evaluation shards).
        skip_corrupt: bool. False: a truncated or corrupt shard raises `CorruptShardError`
            naming the file and record. True: its readable records before the damage are
            kept, the rest skipped, and each such shard is listed in `ShardScan.corrupt`.
        num_classes: int or None. C; None takes it from the shards' `manifest.json` (or the
            largest label + 1 when there is none). Labels outside 0..C-1 other than -1 raise.

    Returns: a `ShardScan`.
    """
    if kind not in ("faces", "pairs"):
        raise ValueError(f"`kind` must be 'faces' or 'pairs'. Received: kind={kind!r}")
    files = list_shards(file_patterns)
    manifests = _manifests_for(files)
    counts, all_labels, all_dims, corrupt = [], [], [], []
    for path in files:
        records.check_record_kind(path, kind)  # before the scan, which would read pair records as unlabelled faces
        manifest = manifests[os.path.dirname(path)] or {}
        expected = {s["file"]: s["records"] for s in manifest.get("shards", [])}.get(os.path.basename(path))
        try:
            labels, dims = _scan_file(path, kind)
            if expected is not None and len(dims) != expected:
                # Cut exactly at a record boundary: every record reads, but some are missing.
                raise CorruptShardError(
                    path, len(dims), f"{len(dims)} records, the manifest lists {expected}"
                )
        except CorruptShardError as e:
            if not skip_corrupt:
                raise
            logging.warning("Skipping the damaged part of a shard: %s", e)
            corrupt.append((path, e.record_index))
            labels, dims = _scan_file(path, kind, limit=e.record_index)
        counts.append(len(dims))
        all_labels.append(labels)
        all_dims.append(dims)
    labels, dims = _concat(all_labels), _concat(all_dims)
    if corrupt:
        logging.warning("Skipped the damaged tails of %d corrupt shard(s)", len(corrupt))
    if len(dims) == 0:
        raise ValueError(f"The shards {files} hold no readable records")
    if len(np.unique(dims)) != 1:
        first = _locate(files, counts, int(np.flatnonzero(dims != dims[0])[0]))
        raise ValueError(
            f"{first}: teacher embeddings differ in length or are missing in some records "
            f"(lengths {sorted(np.unique(dims).tolist())}); re-create the shards with one teacher"
        )
    if kind == "pairs":
        return ShardScan(files, counts, labels, int(dims[0]), 0, corrupt)
    if num_classes is None:
        num_classes = _num_classes_from_manifests(manifests, labels)
    bad = np.flatnonzero((labels < records.UNLABELLED) | (labels >= num_classes))
    if len(bad):
        raise ValueError(
            f"{_locate(files, counts, int(bad[0]))}: label {labels[bad[0]]} is outside "
            f"0..{num_classes - 1} (num_classes={num_classes}); -1 marks a face without "
            f"identity. {len(bad)} record(s) in all."
        )
    return ShardScan(files, counts, labels, int(dims[0]), int(num_classes), corrupt)


def _locate(files, counts, flat_index):
    """'file, record i' for a record's position in the concatenation of all files."""
    ends = np.cumsum(counts)
    file_index = int(np.searchsorted(ends, flat_index, side="right"))
    start = int(ends[file_index - 1]) if file_index else 0
    return f"{files[file_index]}, record {flat_index - start}"


def _record_dataset(scan, input_context, shuffle, seed, deterministic):
    """Serialized records of the scanned files (each cut to its readable part), sharded by file.

    With several input pipelines (workers), pipeline i reads files i, i + n, i + 2n, ... of the
    sorted list: disjoint sets that cover every file (the effect of AutoShardPolicy.FILE, which
    tf.distribute does not apply to `distribute_datasets_from_function`).
    """
    paths, counts = scan.files, scan.counts
    if input_context and input_context.num_input_pipelines > 1:
        num_pipelines, pipeline_id = input_context.num_input_pipelines, input_context.input_pipeline_id
        if len(paths) < num_pipelines:
            # Named by folder: these are input shards or a feature cache (xcos_tf.data.features).
            folders = ", ".join(sorted({os.path.dirname(path) for path in paths}))
            raise ValueError(f"{len(paths)} file(s) in {folders} cannot be split by file over {num_pipelines} input pipelines")
        paths, counts = paths[pipeline_id::num_pipelines], counts[pipeline_id::num_pipelines]
        logging.info("Input pipeline %d of %d reads %d of %d shard files: %s", pipeline_id, num_pipelines,
                     len(paths), len(scan.files), ", ".join(paths))
    files = tf.data.Dataset.from_tensor_slices((tf.constant(paths), tf.constant(counts, tf.int64)))
    if shuffle:
        files = files.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    return files.interleave(
        lambda path, count: tf.data.TFRecordDataset(path).take(count),
        cycle_length=min(len(paths), 8),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )


def decode_image(encoded, image_shape=IMAGE_SHAPE):
    """Encoded JPEG/PNG -> float32 RGB 0..255 of `image_shape`: the eval and serving preprocessing."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image = tf.ensure_shape(image, image_shape)
    return tf.cast(image, tf.float32)


def _parse_face(serialized):
    decoded = records.decode_face(serialized)
    return {
        "image_encoded": decoded["image_encoded"],
        "label": tf.cast(decoded["label"], tf.int32),
        "teacher_embedding": decoded["teacher_embedding"],
        "teacher_embedding_flip": decoded["teacher_embedding_flip"],
    }


def _augment(image, embedding, embedding_flip, seed):
    """Random horizontal flip (the flipped face's teacher embedding goes with it) and mild
    brightness/contrast jitter, all stateless so that a seed fixes every draw."""
    seeds = tf.random.experimental.stateless_split(seed, num=3)
    flip = tf.random.stateless_uniform([], seeds[0]) < 0.5
    image = tf.where(flip, tf.image.flip_left_right(image), image)
    embedding = tf.where(flip, embedding_flip, embedding)
    image = image + tf.random.stateless_uniform([], seeds[1], -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)
    contrast = tf.random.stateless_uniform([], seeds[2], *CONTRAST_RANGE)
    image = tf.image.adjust_contrast(image, contrast)
    return tf.clip_by_value(image, 0.0, 255.0), embedding


def _same_pairs(faces):
    """Pairs of two different faces of one identity: per-label windows of two."""
    pairs = faces.filter(lambda face: face["label"] >= 0).group_by_window(
        key_func=lambda face: tf.cast(face["label"], tf.int64),
        reduce_func=lambda _, window: window.batch(2),
        window_size=2,
    )
    # A class with a single face would otherwise pair that face with itself across epochs.
    return pairs.filter(
        lambda pair: tf.logical_and(
            tf.shape(pair["label"])[0] == 2,
            pair["image_encoded"][0] != pair["image_encoded"][-1],
        )
    )


def _different_pairs(faces):
    """Consecutive faces of the shuffled stream, dropping the rare pairs of one identity."""
    pairs = faces.batch(2, drop_remainder=True)
    return pairs.filter(
        lambda pair: tf.logical_or(pair["label"][0] != pair["label"][1], pair["label"][0] < 0)
    )


def pair_dataset(file_patterns, batch_size, same_fraction=0.5, augment=True,
                 shuffle_buffer=10_000, seed=None, deterministic=False, input_context=None,
                 skip_corrupt=False, num_classes=None, image_shape=IMAGE_SHAPE, repeat=True):
    """Training pairs from face shards, batched in the project's batch contract.

    Args:
        file_patterns: str or list of glob patterns or shard folders (make_shards output,
            written with a teacher).
        batch_size: int, the global batch size (divided per replica with `input_context`).
        same_fraction: float in [0, 1], default 0.5 (the paper's). Expected share of
            same-identity pairs; faces without identity (-1) only appear in different pairs.
        augment: bool, default True. Random flips (with the flipped teacher embedding) and mild
            brightness/contrast.
        shuffle_buffer: int, records in each shuffle buffer.
        seed: int or None. Fixes file order, shuffles, pair mixing and augmentation draws.
        deterministic: bool. True keeps the element order fixed (needs a seed): the same
            batches in every run; False lets parallel stages run out of order (faster).
        input_context: `tf.distribute.InputContext` or None. Shards by file over input
            pipelines and batches per replica.
        skip_corrupt: bool. See `scan_shards`.
        num_classes: int or None. See `scan_shards`.
        image_shape: the stored face shape, default (112, 112, 3).
        repeat: bool, default True: an endless stream (training counts steps).

    Returns: a `tf.data.Dataset` of dicts `image_a`, `image_b`, `label_a`, `label_b`,
    `teacher_cos`.
    """
    if not 0.0 <= same_fraction <= 1.0:
        raise ValueError(f"`same_fraction` must be in [0, 1]. Received: {same_fraction}")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1. Received: {batch_size}")
    if deterministic and seed is None:
        raise ValueError("deterministic=True needs a seed. Received: seed=None")
    scan = scan_shards(file_patterns, "faces", skip_corrupt, num_classes)
    if scan.teacher_dim == 0:
        raise ValueError(
            f"The shards {scan.files} hold no teacher embeddings, which training needs for "
            "teacher_cos: re-create them with make_shards --teacher=PATH"
        )
    per_class = np.bincount(scan.labels[scan.labels >= 0], minlength=1)
    if same_fraction > 0 and not np.any(per_class >= 2):
        raise ValueError(
            f"same_fraction={same_fraction}, but no identity has two faces in {scan.files}"
        )

    def to_example(index, pair, pair_seed):
        image_a = decode_image(pair["image_encoded"][0], image_shape)
        image_b = decode_image(pair["image_encoded"][1], image_shape)
        embedding_a, embedding_b = pair["teacher_embedding"][0], pair["teacher_embedding"][1]
        if augment:
            seeds = tf.random.experimental.stateless_split(pair_seed, num=2)
            image_a, embedding_a = _augment(image_a, embedding_a, pair["teacher_embedding_flip"][0], seeds[0])
            image_b, embedding_b = _augment(image_b, embedding_b, pair["teacher_embedding_flip"][1], seeds[1])
        return {
            "image_a": image_a,
            "image_b": image_b,
            "label_a": pair["label"][0],
            "label_b": pair["label"][1],
            "teacher_cos": tf.clip_by_value(tf.reduce_sum(embedding_a * embedding_b), -1.0, 1.0),
        }

    return sample_pairs(scan, _parse_face, to_example, batch_size, same_fraction, shuffle_buffer, seed,
                        deterministic, input_context, repeat)


def sample_pairs(scan, parse, to_example, batch_size, same_fraction=0.5, shuffle_buffer=10_000, seed=None,
                 deterministic=False, input_context=None, repeat=True):
    """The pair sampler behind `pair_dataset`, for any record type.

    Args:
        scan: a `ShardScan` of the shards to read (files, readable record counts).
        parse: serialized record -> dict with at least `label` (int32) and `image_encoded` (a
            string unique to the record, so that a face is never paired with itself).
        to_example: (index, pair, pair_seed) -> one example dict; `pair` holds the parsed
            dicts of both faces stacked on a leading axis of 2, `pair_seed` an int64 [2]
            stateless seed unique to this pair.
        batch_size, same_fraction, shuffle_buffer, seed, deterministic, input_context, repeat:
            as in `pair_dataset`.

    Returns: batched, prefetched examples; same-identity pairs with probability
    `same_fraction`, faces with label -1 only in different pairs.
    """
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    if input_context:
        batch_size = input_context.get_per_replica_batch_size(batch_size)

    def faces(stream_seed):
        stream = _record_dataset(scan, input_context, True, stream_seed, deterministic)
        if repeat:
            stream = stream.repeat()
        stream = stream.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
        return stream.shuffle(shuffle_buffer, seed=stream_seed, reshuffle_each_iteration=True)

    streams, weights = [], []
    if same_fraction > 0:
        streams.append(_same_pairs(faces(seed + 1)))
        weights.append(same_fraction)
    if same_fraction < 1:
        streams.append(_different_pairs(faces(seed + 2)))
        weights.append(1.0 - same_fraction)
    pairs = streams[0] if len(streams) == 1 else tf.data.Dataset.sample_from_datasets(
        streams, weights, seed=seed + 3
    )
    # Enumerate before the parallel map: each pair's random draws depend on its position only.
    dataset = pairs.enumerate().map(
        lambda index, pair: to_example(index, pair, tf.stack([tf.constant(seed, tf.int64), index])),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
    dataset = dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    # The files are already sharded by hand above; keep tf.distribute from sharding again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)


def eval_pair_dataset(file_patterns, batch_size, image_shape=IMAGE_SHAPE, skip_corrupt=False):
    """Evaluation pairs from pair shards, in file order, not augmented, last batch kept.

    Returns batches of dicts: `image_a`, `image_b` float32 [B, H, W, 3] 0..255, `is_same`
    bool [B], `fold` int32 [B], `name_a`, `name_b`, `source_a`, `source_b` string [B], and
    `teacher_cos` float32 [B] when the shards hold teacher embeddings.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1. Received: {batch_size}")
    scan = scan_shards(file_patterns, "pairs", skip_corrupt)
    has_teacher = scan.teacher_dim > 0

    def to_example(serialized):
        pair = records.decode_pair(serialized)
        example = {
            "image_a": decode_image(pair["image_a"], image_shape),
            "image_b": decode_image(pair["image_b"], image_shape),
            "is_same": pair["is_same"] > 0,
            "fold": tf.cast(pair["fold"], tf.int32),
        }
        example.update({key: pair[key] for key in ("name_a", "name_b", "source_a", "source_b")})
        if has_teacher:
            example["teacher_cos"] = tf.reduce_sum(pair["teacher_a"] * pair["teacher_b"])
        return example

    dataset = _record_dataset(scan, None, False, None, True)
    dataset = dataset.map(to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def synthetic_pair_dataset(batch_size, image_shape=IMAGE_SHAPE, num_classes=16, seed=0,
                           same_fraction=0.5):
    """An endless repeat of one random batch in the training batch contract.

    For smoke tests and speed tests of the model: costs nothing to produce (as arcface_torch's
    synthetic loader), so a step-rate measurement sees only the model.
    """
    if batch_size < 1 or num_classes < 2:
        raise ValueError(
            f"Need batch_size >= 1 and num_classes >= 2. Received: {batch_size}, {num_classes}"
        )
    rng = np.random.default_rng(seed)
    label_a = rng.integers(0, num_classes, batch_size)
    same = rng.random(batch_size) < same_fraction
    label_b = np.where(same, label_a, (label_a + rng.integers(1, num_classes, batch_size)) % num_classes)
    teacher_cos = np.where(same, rng.uniform(0.3, 0.9, batch_size), rng.uniform(-0.2, 0.3, batch_size))
    batch = {
        "image_a": rng.uniform(0, 255, (batch_size, *image_shape)).astype(np.float32),
        "image_b": rng.uniform(0, 255, (batch_size, *image_shape)).astype(np.float32),
        "label_a": label_a.astype(np.int32),
        "label_b": label_b.astype(np.int32),
        "teacher_cos": teacher_cos.astype(np.float32),
    }
    return tf.data.Dataset.from_tensors(batch).repeat()
