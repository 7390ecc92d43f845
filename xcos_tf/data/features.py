"""Cached backbone feature maps: train the xCos head of a frozen backbone without the backbone.

With the backbone frozen (BatchNormalization in inference mode), its output for a given face
never changes, so running it at every step is wasted work: on a 2-core CPU a MobileFaceNet
step on 256 pairs costs seconds, the grid head and attention on cached 7x7x512 maps a few
milliseconds. `write_feature_shards` runs the backbone ONCE over face shards (each face and its
horizontal flip, so that training keeps the flip augmentation) or over evaluation pair shards,
and writes feature shards (float16 maps) with a `manifest.json` that records the backbone's
weight fingerprint: a cache made with other weights is refused, not silently used.

The cache is cut at the end of every source shard (and every 1,000 records within one), so it
has at least as many files as its source and `distribute_datasets_from_function` can split it
by file over workers like the shards themselves. It is written in a staging folder beside it
(`OUT_DIR.partial`, where a killed run resumes), then its files are moved into place and its
manifest is written last: a process that finds a complete manifest finds the whole cache, and
other processes wait for it with `wait_for_cache` instead of computing it again.

`feature_pair_dataset` samples training pairs from face feature shards with the same pair
sampler as the image pipeline (`pipeline.sample_pairs`) and yields
    {"feature_a", "feature_b": float32 [B, H, W, C], "label_a", "label_b": int32 [B],
     "teacher_cos": float32 [B]}
(plus `occluded_features`' fields with occlusion), which `XCosTrainer` takes in place of
`image_a`/`image_b`. `eval_feature_pairs` loads pair feature shards as numpy arrays.
"""
import functools
import hashlib
import os
import shutil
import time

import numpy as np
import tensorflow as tf
from absl import logging

from xcos_tf import progress as progress_lib
from xcos_tf.data import pipeline, records

FEATURE_FACE_KEYS = {
    "map": "feature/map",
    "map_flip": "feature/map_flip",
    "label": "image/label",
    "identity": "image/identity",
    "source": "image/source",
    "teacher_embedding": "teacher/embedding",
    "teacher_embedding_flip": "teacher/embedding_flip",
}
FEATURE_PAIR_KEYS = {
    "map_a": "feature/map_a",
    "map_b": "feature/map_b",
    "is_same": "pair/is_same",
    "fold": "pair/fold",
    "teacher_a": "pair/teacher_a",
    "teacher_b": "pair/teacher_b",
}
FEATURE_DTYPE = np.float16  # halves the cache; the maps' relative error stays below 1e-3
RECORDS_PER_SHARD = 1000  # a cache file holds at most this many records (about 100 MB of 7x7x512 maps)


class StaleFeatureCacheError(ValueError):
    """A feature cache written from other source shards or other backbone weights."""


class CacheWriterLostError(RuntimeError):
    """The process writing a feature cache that this one waits for stopped or stalled."""


def shard_ends(counts, records_per_shard=RECORDS_PER_SHARD):
    """Record positions (in the concatenation of source shards of `counts` records) where the
    cache is cut: every source shard's end and every `records_per_shard` records within one."""
    ends, total = [], 0
    for count in counts:
        ends.extend(range(total + records_per_shard, total + count, records_per_shard))
        total += count
        if count:
            ends.append(total)
    return ends


def staging_dir(out_dir):
    """The folder where the cache of `out_dir` is written before it is moved into place."""
    return os.path.normpath(os.fspath(out_dir)) + ".partial"


def planned_file_count(out_dir, counts):
    """How many files the cache in `out_dir` of source shards of `counts` records has (when
    complete) or will have once written (when absent or partial)."""
    manifest = records.read_manifest(out_dir)
    if manifest is not None and manifest.get("complete"):
        return len(manifest["shards"])
    progress = manifest or records.read_manifest(staging_dir(out_dir)) or {"shards": []}
    done = progress["shards"]
    end = done[-1]["end"] if done else 0
    return len(done) + sum(1 for cut in shard_ends(counts) if cut > end)


def backbone_fingerprint(backbone):
    """sha256 of the backbone's weights: identifies the maps a cache holds."""
    digest = hashlib.sha256()
    for weight in backbone.weights:
        digest.update(weight.path.encode("utf-8"))
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()


def _bytes_feature(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def map_feature(feature_map):
    """A feature map as a record field: its `FEATURE_DTYPE` bytes (`parse_map` reads it)."""
    return _bytes_feature(np.ascontiguousarray(feature_map, dtype=FEATURE_DTYPE).tobytes())


def _encode_face(face, feature_map, feature_map_flip, extra):
    feature = {
        FEATURE_FACE_KEYS["map"]: map_feature(feature_map),
        FEATURE_FACE_KEYS["map_flip"]: map_feature(feature_map_flip),
        FEATURE_FACE_KEYS["label"]: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(face["label"])])),
        FEATURE_FACE_KEYS["identity"]: _bytes_feature(face["identity"]),
        FEATURE_FACE_KEYS["source"]: _bytes_feature(face["source"]),
    }
    for key in ("teacher_embedding", "teacher_embedding_flip"):
        feature[FEATURE_FACE_KEYS[key]] = tf.train.Feature(float_list=tf.train.FloatList(value=face[key].tolist()))
    feature.update(extra)
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


def _encode_pair(pair, map_a, map_b):
    feature = {
        FEATURE_PAIR_KEYS["map_a"]: map_feature(map_a),
        FEATURE_PAIR_KEYS["map_b"]: map_feature(map_b),
        FEATURE_PAIR_KEYS["is_same"]: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(pair["is_same"])])),
        FEATURE_PAIR_KEYS["fold"]: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(pair["fold"])])),
    }
    for key in ("teacher_a", "teacher_b"):
        feature[FEATURE_PAIR_KEYS[key]] = tf.train.Feature(float_list=tf.train.FloatList(value=pair[key].tolist()))
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


def _source_batches(scan, kind, batch_size, start, image_shape):
    """Decoded records of the scanned shards in file order from record `start`, batched."""
    dataset = tf.data.Dataset.from_tensor_slices((tf.constant(scan.files), tf.constant(scan.counts, tf.int64)))
    dataset = dataset.flat_map(lambda path, count: tf.data.TFRecordDataset(path).take(count)).skip(start)
    if kind == "faces":
        def decode(serialized):
            face = records.decode_face(serialized)
            face["image"] = pipeline.decode_image(face.pop("image_encoded"), image_shape)
            return face
    else:
        def decode(serialized):
            pair = records.decode_pair(serialized)
            pair["image_a"] = pipeline.decode_image(pair["image_a"], image_shape)
            pair["image_b"] = pipeline.decode_image(pair["image_b"], image_shape)
            return pair
    return dataset.map(decode, num_parallel_calls=2).batch(batch_size).prefetch(1)


def _cache_config(scan, kind, fingerprint, feature_shape):
    return {
        "kind": f"feature_{kind}",
        "source_files": [os.path.realpath(f) for f in scan.files],  # one cache however its shards are reached
        "source_counts": list(scan.counts),
        "backbone_sha256": fingerprint,
        "feature_shape": list(feature_shape),
        "feature_dtype": np.dtype(FEATURE_DTYPE).name,
    }


def write_feature_shards(backbone, shard_patterns, out_dir, kind="faces", batch_size=64, progress=True, extra=None):
    """Runs the frozen `backbone` once over face or pair shards and writes feature shards.

    Args:
        backbone: `keras.Model`, aligned face (RGB 0..255) -> feature map; called with
            `training=False`.
        shard_patterns: str or list, the make_shards output (face shards with teacher
            embeddings, or evaluation pair shards).
        out_dir: folder of the feature shards and `manifest.json`.
        kind: `"faces"` (each face and its horizontal flip) or `"pairs"`.
        batch_size: int, faces per backbone call.
        extra: optional, faces only: more fields per record, from an object with `config` (a
            dict for the manifest: a cache of other settings is refused) and
            `features(batch, start, maps_of)` -> one `{key: tf.train.Feature}` per face of the
            decoded `batch` (records `start`...; `maps_of`: images -> backbone maps), e.g.
            `occluded_features.OccludedFaces`.

    Re-running with the same inputs and weights continues after the last finished shard, or
    does nothing when the cache is complete; other inputs or weights raise
    `StaleFeatureCacheError`. Returns the manifest.
    """
    if kind not in ("faces", "pairs"):
        raise ValueError(f"`kind` must be 'faces' or 'pairs'. Received: kind={kind!r}")
    if extra is not None and kind != "faces":
        raise ValueError("`extra` fields are written into face caches only (kind='faces')")
    scan = pipeline.scan_shards(shard_patterns, kind)
    if scan.teacher_dim == 0:
        raise ValueError(f"The shards {scan.files} hold no teacher embeddings: re-create them with make_shards --teacher")
    feature_shape = tuple(backbone.output_shape[1:])
    config = _cache_config(scan, kind, backbone_fingerprint(backbone), feature_shape)
    if kind == "faces":
        source_manifest = records.read_manifest(os.path.dirname(scan.files[0])) or {}
        config["num_classes"] = scan.num_classes
        config["classes"] = source_manifest.get("classes", [])
        if extra is not None:
            config["extra"] = extra.config
    out_dir, staging = os.fspath(out_dir), staging_dir(out_dir)
    manifest = records.read_manifest(out_dir)
    if manifest is not None:
        _check_same_source(manifest, config, out_dir)
        if manifest.get("complete") and all(_intact(out_dir, s) for s in manifest["shards"]):
            return manifest
        if not os.path.exists(staging):
            # A partial cache of an earlier version (or a damaged one): continue it in the staging folder.
            os.rename(out_dir, staging)
    os.makedirs(staging, exist_ok=True)
    staged = records.read_manifest(staging)
    shards = []
    if staged is not None:
        _check_same_source(staged, config, staging)
        for entry in staged["shards"]:  # continue after the last intact shard
            if not _intact(staging, entry):
                break
            shards.append(entry)
    total = int(sum(scan.counts))
    start = shards[-1]["end"] if shards else 0
    logging.info("Computing the feature cache %s: records %d to %d, staged in %s", out_dir, start, total, staging)
    cuts = [cut for cut in shard_ends(scan.counts) if cut > start]

    @tf.function(reduce_retracing=True)
    def maps_of(images):
        return backbone(images, training=False)

    def write(pending, end):
        entry = records.write_shard(os.path.join(staging, records.shard_name("features", len(shards))), pending)
        entry["end"] = end
        shards.append(entry)
        records.write_json_atomic(os.path.join(staging, records.MANIFEST_NAME),
                                  dict(config, shards=shards, num_records=end, complete=False))

    pending, index, maps_by_source = [], start, {}
    bar = progress_lib.bar(total=total, initial=start, description=f"feature maps ({kind})", unit="record",
                           show=progress)
    # The backbone's input size: the faces of the shards must have it.
    for batch in _source_batches(scan, kind, batch_size, start, tuple(backbone.input_shape[1:])):
        batch = {key: value.numpy() for key, value in batch.items()}
        if kind == "faces":
            feature_maps = maps_of(batch["image"]).numpy()
            feature_maps_flip = maps_of(batch["image"][:, :, ::-1]).numpy()
            added = extra.features(batch, index, maps_of) if extra is not None else [{}] * len(feature_maps)
            for i in range(len(feature_maps)):
                face = {key: value[i] for key, value in batch.items()}
                pending.append(_encode_face(face, feature_maps[i], feature_maps_flip[i], added[i]))
        else:
            # Evaluation sets reuse faces across pairs: each distinct face runs once.
            # (A face without a source path is its own key.)
            keys = {side: [source or (side, index + i) for i, source in enumerate(batch[f"source_{side}"])]
                    for side in ("a", "b")}
            missing = {}
            for side in ("a", "b"):
                for key, image in zip(keys[side], batch[f"image_{side}"]):
                    if key not in maps_by_source:
                        missing[key] = image
            if missing:
                computed = maps_of(np.stack(list(missing.values()))).numpy()
                maps_by_source.update(zip(missing, computed))
            for i in range(len(batch["is_same"])):
                pair = {key: value[i] for key, value in batch.items()}
                pending.append(_encode_pair(pair, maps_by_source[keys["a"][i]], maps_by_source[keys["b"][i]]))
        index += len(next(iter(batch.values())))
        bar.update(len(next(iter(batch.values()))))
        while cuts and index >= cuts[0]:  # a batch may span the end of a source shard
            size = len(pending) - (index - cuts[0])
            write(pending[:size], cuts.pop(0))
            pending = pending[size:]
    bar.close()
    return _move_into_place(staging, out_dir, dict(config, shards=shards, num_records=total, complete=True))


def _check_same_source(manifest, config, folder):
    changed = [key for key in config if manifest.get(key) != config[key]]
    if changed:
        raise StaleFeatureCacheError(
            f"{folder} holds features of other inputs or backbone weights ({', '.join(changed)} differ); "
            "delete it or choose another folder"
        )


def _intact(folder, entry):
    path = os.path.join(folder, entry["file"])
    return os.path.isfile(path) and records.sha256_file(path) == entry["sha256"]


def _move_into_place(staging, out_dir, manifest):
    """Moves the staged shards into `out_dir`, then writes its manifest: the last file, so that
    a complete manifest always describes files that are all there."""
    os.makedirs(out_dir, exist_ok=True)
    for entry in manifest["shards"]:
        os.replace(os.path.join(staging, entry["file"]), os.path.join(out_dir, entry["file"]))
    records.write_json_atomic(os.path.join(out_dir, records.MANIFEST_NAME), manifest)
    shutil.rmtree(staging)
    return manifest


def wait_for_cache(out_dir, writer_alive, poll_seconds=2.0, stall_seconds=1800.0):
    """Waits for another process (the chief) to complete the feature cache in `out_dir`.

    Args:
        writer_alive: `() -> bool`, whether the writing process still runs.
        stall_seconds: how long the staging folder may stay unchanged (no new bytes written).

    Returns the cache's manifest; raises `CacheWriterLostError` when the writer stops or stalls.
    """
    last_state, last_change = None, time.monotonic()
    while True:
        manifest = records.read_manifest(out_dir)
        if manifest is not None and manifest.get("complete"):
            return manifest
        staging = staging_dir(out_dir)
        state = sorted((e.name, e.stat().st_size) for e in os.scandir(staging)) if os.path.isdir(staging) else None
        if state != last_state:
            last_state, last_change = state, time.monotonic()
        if not writer_alive():
            raise CacheWriterLostError(
                f"The process writing the feature cache {out_dir} stopped before it was complete; start the job "
                "again (the cache resumes where it stopped)"
            )
        if time.monotonic() - last_change > stall_seconds:
            raise CacheWriterLostError(
                f"The feature cache {out_dir} got no new bytes in {stall_seconds:.0f} s ({staging} unchanged); "
                "is its writer stuck, or the cache folder not on storage shared by all workers?"
            )
        time.sleep(poll_seconds)


def check_cache(out_dir, backbone=None, kind=None):
    """The manifest of a complete feature cache; raises naming the problem otherwise
    (missing, incomplete, other kind, or made with other backbone weights)."""
    manifest = records.read_manifest(out_dir)
    if manifest is None or not manifest.get("complete"):
        raise FileNotFoundError(f"{out_dir}: no complete feature cache (write_feature_shards makes one)")
    if kind is not None and manifest["kind"] != f"feature_{kind}":
        raise ValueError(f"{out_dir} holds {manifest['kind']}, expected feature_{kind}")
    if backbone is not None and manifest["backbone_sha256"] != backbone_fingerprint(backbone):
        raise StaleFeatureCacheError(f"{out_dir} was written with other backbone weights; re-create it")
    return manifest


def parse_map(encoded, shape):
    """A cached map's float16 bytes -> float32 `shape`."""
    feature_map = tf.io.decode_raw(encoded, tf.float16)
    return tf.cast(tf.reshape(feature_map, shape), tf.float32)


def cached_face_maps(caches):
    """(shard files, parse) of face caches: `parse` turns one record into its map and
    its mirror image's map, stacked `[2, H, W, C]`."""
    manifests = [check_cache(cache, kind="faces") for cache in caches]
    shape = tuple(manifests[0]["feature_shape"])
    files = [os.path.join(cache, shard["file"]) for cache, manifest in zip(caches, manifests) for shard in manifest["shards"]]
    spec = {FEATURE_FACE_KEYS[key]: tf.io.FixedLenFeature([], tf.string) for key in ("map", "map_flip")}

    def parse(serialized):
        parsed = tf.io.parse_single_example(serialized, spec)
        return tf.stack([parse_map(parsed[FEATURE_FACE_KEYS[key]], shape) for key in ("map", "map_flip")])

    return files, parse


def _face_parser(shape, parse_extra=None):
    features = {
        FEATURE_FACE_KEYS["map"]: tf.io.FixedLenFeature([], tf.string),
        FEATURE_FACE_KEYS["map_flip"]: tf.io.FixedLenFeature([], tf.string),
        FEATURE_FACE_KEYS["label"]: tf.io.FixedLenFeature([], tf.int64),
        FEATURE_FACE_KEYS["source"]: tf.io.FixedLenFeature([], tf.string),
        FEATURE_FACE_KEYS["teacher_embedding"]: tf.io.FixedLenSequenceFeature([], tf.float32, allow_missing=True),
        FEATURE_FACE_KEYS["teacher_embedding_flip"]: tf.io.FixedLenSequenceFeature([], tf.float32, allow_missing=True),
    }

    def parse(serialized):
        parsed = tf.io.parse_single_example(serialized, features)
        # The maps stay encoded until a pair is formed: the shuffle buffers hold bytes only once.
        face = parse_extra(serialized) if parse_extra else {}
        return face | {
            "map": parsed[FEATURE_FACE_KEYS["map"]],
            "map_flip": parsed[FEATURE_FACE_KEYS["map_flip"]],
            "label": tf.cast(parsed[FEATURE_FACE_KEYS["label"]], tf.int32),
            # The pair sampler's key for "the same record": the encoded map is unique per face.
            "image_encoded": parsed[FEATURE_FACE_KEYS["map"]],
            "teacher_embedding": parsed[FEATURE_FACE_KEYS["teacher_embedding"]],
            "teacher_embedding_flip": parsed[FEATURE_FACE_KEYS["teacher_embedding_flip"]],
        }

    return parse


def feature_pair_dataset(cache_dirs, batch_size, same_fraction=0.5, flip=True, shuffle_buffer=8_000, seed=None,
                         deterministic=False, input_context=None, repeat=True, occlusion=None):
    """Training pairs of cached feature maps (see the module docstring), batched.

    Args:
        cache_dirs: str or list, complete face feature caches (`write_feature_shards(kind=
            "faces")`) of one backbone: one labelled set (one label space) plus any number of
            unlabelled ones (all labels -1).
        batch_size: int, the global batch size (divided per replica with `input_context`).
        same_fraction, shuffle_buffer, seed, deterministic, input_context, repeat: as
            `pipeline.pair_dataset`.
        flip: bool, default True. Each face of a pair is taken flipped with probability 1/2
            (the flipped map with the flipped face's teacher embedding).
        occlusion: optional `occluded_features.OcclusionSampler` (caches written with its
            `OccludedFaces`): face B of some pairs is its occluded version, and the example
            says where the occluder lies.
    """
    if isinstance(cache_dirs, (str, os.PathLike)):
        cache_dirs = [cache_dirs]
    manifests = [check_cache(d, kind="faces") for d in cache_dirs]
    if len({m["backbone_sha256"] for m in manifests}) != 1:
        raise StaleFeatureCacheError(f"The feature caches {cache_dirs} come from different backbone weights")
    if sum(1 for m in manifests if m["num_classes"]) > 1:
        raise ValueError(f"Several of {cache_dirs} hold labelled faces: their label spaces differ")
    shape = tuple(manifests[0]["feature_shape"])
    files = [os.path.join(d, s["file"]) for d, m in zip(cache_dirs, manifests) for s in m["shards"]]
    counts = [s["records"] for m in manifests for s in m["shards"]]
    num_classes = max(m["num_classes"] for m in manifests)
    parse = _face_parser(shape, occlusion.parse if occlusion else None)

    def to_example(index, pair, pair_seed):
        seeds = tf.random.experimental.stateless_split(pair_seed, num=3)
        sides = []
        for side in range(2):
            flipped = tf.random.stateless_uniform([], seeds[side]) < (0.5 if flip else 0.0)
            feature_map = parse_map(tf.where(flipped, pair["map_flip"][side], pair["map"][side]), shape)
            embedding = tf.where(flipped, pair["teacher_embedding_flip"][side], pair["teacher_embedding"][side])
            sides.append((feature_map, embedding))
        example = {}
        if occlusion:
            *sides[1], example = occlusion.occlude_b(pair, seeds[2], *sides[1], shape)
        return example | {
            "feature_a": sides[0][0],
            "feature_b": sides[1][0],
            "label_a": pair["label"][0],
            "label_b": pair["label"][1],
            "teacher_cos": tf.clip_by_value(tf.reduce_sum(sides[0][1] * sides[1][1]), -1.0, 1.0),
        }

    labels = np.concatenate([_labels_of(f) for f in files])
    scan = pipeline.ShardScan(files, counts, labels, 0, num_classes, [])
    return pipeline.sample_pairs(scan, parse, to_example, batch_size, same_fraction, shuffle_buffer, seed,
                                 deterministic, input_context, repeat)


def _labels_of(path):
    # train.py builds the dataset anew every epoch; a written cache shard never changes.
    stat = os.stat(path)
    return _read_labels(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _read_labels(path, size, mtime_ns):
    """Labels of a face feature shard (`size` and `mtime_ns` key the cache), read-only."""
    del size, mtime_ns
    feature = {FEATURE_FACE_KEYS["label"]: tf.io.FixedLenFeature([], tf.int64)}
    dataset = tf.data.TFRecordDataset(path).batch(1024).map(lambda s: tf.io.parse_example(s, feature))
    labels = np.concatenate([b[FEATURE_FACE_KEYS["label"]].numpy() for b in dataset])
    labels.flags.writeable = False
    return labels


def eval_feature_pairs(cache_dir, max_pairs=0):
    """A pair feature cache as numpy: map_a, map_b float32 [N, H, W, C], is_same bool [N],
    fold int32 [N], teacher_cos float32 [N]."""
    manifest = check_cache(cache_dir, kind="pairs")
    shape = tuple(manifest["feature_shape"])
    features = {
        FEATURE_PAIR_KEYS["map_a"]: tf.io.FixedLenFeature([], tf.string),
        FEATURE_PAIR_KEYS["map_b"]: tf.io.FixedLenFeature([], tf.string),
        FEATURE_PAIR_KEYS["is_same"]: tf.io.FixedLenFeature([], tf.int64),
        FEATURE_PAIR_KEYS["fold"]: tf.io.FixedLenFeature([], tf.int64),
        FEATURE_PAIR_KEYS["teacher_a"]: tf.io.FixedLenSequenceFeature([], tf.float32, allow_missing=True),
        FEATURE_PAIR_KEYS["teacher_b"]: tf.io.FixedLenSequenceFeature([], tf.float32, allow_missing=True),
    }

    def parse(serialized):
        parsed = tf.io.parse_single_example(serialized, features)
        return {
            "map_a": parse_map(parsed[FEATURE_PAIR_KEYS["map_a"]], shape),
            "map_b": parse_map(parsed[FEATURE_PAIR_KEYS["map_b"]], shape),
            "is_same": parsed[FEATURE_PAIR_KEYS["is_same"]] > 0,
            "fold": tf.cast(parsed[FEATURE_PAIR_KEYS["fold"]], tf.int32),
            "teacher_cos": tf.reduce_sum(parsed[FEATURE_PAIR_KEYS["teacher_a"]] * parsed[FEATURE_PAIR_KEYS["teacher_b"]]),
        }

    files = [os.path.join(cache_dir, s["file"]) for s in manifest["shards"]]
    dataset = tf.data.TFRecordDataset(files)
    if max_pairs:
        dataset = dataset.take(max_pairs)
    parts = [b for b in dataset.map(parse, num_parallel_calls=2).batch(512)]
    return {key: np.concatenate([p[key].numpy() for p in parts]) for key in parts[0]}
