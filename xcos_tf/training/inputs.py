"""The training run's data: the shards checked up front (`resolve_data`), the feature caches
of --cache_backbone_features, and the per-replica dataset function of each epoch."""
import dataclasses
import os
import socket

from absl import logging

import tensorflow as tf

from xcos_tf.data import features, occluded_features, pipeline, records
from xcos_tf.training.config import ConfigError, init_backbone_kind


def resolve_data(config, num_input_pipelines=1):
    """Checks the shards (corrupt records, labels, teacher embeddings) and that the files to
    train on (shards, or the feature caches of --cache_backbone_features) can be split by file
    over `num_input_pipelines` (workers); fills in `num_classes` from the shards. Raises
    `ConfigError` naming the flag. Reads labels only: nothing is computed or written yet."""
    if config.eval_pairs:
        num_pairs = sum(_scan("eval_pairs", config.eval_pairs, "pairs").counts)
        if min(num_pairs, config.eval_max_pairs or num_pairs) < 10:
            raise ConfigError("eval_pairs", f"hold too few pairs for 10-fold accuracy: {num_pairs} (--eval_max_pairs={config.eval_max_pairs})")
    if config.data == "shards":
        scan = _scan("train_shards", config.train_shards, "faces", num_classes=config.num_classes or None)
        if scan.teacher_dim == 0:
            raise ConfigError("train_shards", "hold no teacher embeddings: re-create them with make_shards --teacher=PATH")
        if num_input_pipelines > 1:
            _check_split(config, scan, num_input_pipelines)
        if config.occlusion_fraction:
            occlusion_teacher(config)
        return dataclasses.replace(config, num_classes=scan.num_classes)
    return config


def num_input_pipelines(strategy):
    """How many input pipelines `distribute_datasets_from_function` makes: one per worker."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 1
    cluster = resolver.cluster_spec().as_dict()
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def _check_split(config, scan, num_pipelines):
    """Each input pipeline reads its own files (sharding by file): there must be enough of them."""
    if not config.cache_backbone_features:
        if len(scan.files) < num_pipelines:
            raise ConfigError(
                "train_shards", f"hold {len(scan.files)} shard file(s), which cannot be split by file over "
                f"{num_pipelines} workers; write more, smaller shards (make_shards --shard_mb)",
            )
        return
    counts = dict(zip(scan.files, scan.counts))
    planned, fresh = {}, {}  # files per cache: as it is (or will be), and if written anew
    for cache, files in _cache_sources(config):
        planned[cache] = features.planned_file_count(cache, [counts[f] for f in files])
        fresh[cache] = len(features.shard_ends([counts[f] for f in files]))
    if sum(planned.values()) >= num_pipelines:
        return
    problem = (f"cannot split its feature caches by file over {num_pipelines} workers: "
               + ", ".join(f"{cache} holds {count} file(s)" for cache, count in planned.items()))
    if sum(fresh.values()) >= num_pipelines:  # caches written whole by an earlier version
        old = [cache for cache in planned if planned[cache] < fresh[cache]]
        raise ConfigError("cache_backbone_features", f"{problem}; delete {', '.join(old)} so that it is written "
                          "again in more files (cut at every input shard's end), or train with fewer workers")
    raise ConfigError("cache_backbone_features", f"{problem} (one per input shard, at most "
                      f"{features.RECORDS_PER_SHARD} faces each); write more, smaller input shards "
                      "(make_shards --shard_mb) or train with fewer workers")


def _scan(flag, patterns, kind, **kwargs):
    try:
        return pipeline.scan_shards(list(patterns), kind, **kwargs)
    except (OSError, ValueError) as error:
        raise ConfigError(flag, f"cannot be used: {error}") from None


def occlusion_teacher(config):
    """--occlusion_fraction: the teacher to run on the occluded faces (`--occlusion_teacher`, else
    the --init_backbone ONNX file), checked to be the one that embedded the training shards."""
    path = config.occlusion_teacher or init_backbone_kind(config.init_backbone)[1]
    try:
        return occluded_features.shards_teacher(path, pipeline.list_shards(list(config.train_shards)))
    except (OSError, ValueError) as error:
        raise ConfigError("occlusion_teacher", f"cannot be used: {error}") from None


def _cache_sources(config):
    """[(feature cache folder, its source shard files)]: one cache per folder of training shards
    (one make_shards run each); with --occlusion_fraction, caches that also hold occluded faces."""
    root = config.feature_cache_dir or os.path.join(config.model_dir, "feature_cache")
    files = pipeline.list_shards(list(config.train_shards))
    folders = sorted({os.path.dirname(path) for path in files})
    suffix = "_occluded" if config.occlusion_fraction else ""
    return [(os.path.join(root, f"{index:02d}_{os.path.basename(folder)}{suffix}"),
             [f for f in files if os.path.dirname(f) == folder]) for index, folder in enumerate(folders)]


def feature_caches(config, backbone, writer_alive=None):
    """--cache_backbone_features: the feature caches of the training shards, written on the
    first run and reused (or continued) afterwards. Returns their folders.

    With `writer_alive` (`() -> bool`, whether the chief still runs), this process is not the
    chief: it waits for the chief to write them (on storage every worker sees), then checks
    that they hold the maps of its own backbone.
    """
    caches = []
    extra = None
    if config.occlusion_fraction and writer_alive is None:  # the writer runs the teacher on the occluded faces
        extra = occluded_features.OccludedFaces(occlusion_teacher(config), config.seed)
    for cache, files in _cache_sources(config):
        if writer_alive is None:
            features.write_feature_shards(backbone, files, cache, extra=extra)
        else:
            logging.info("Not the chief: this worker waits for the chief's feature cache %s.", cache)
            features.wait_for_cache(cache, writer_alive)
            features.check_cache(cache, backbone, kind="faces")
        caches.append(cache)
    return caches


def chief_alive(strategy):
    """`() -> bool`: whether the chief's server (its TF_CONFIG address) still accepts connections."""
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    host, port = (cluster.get("chief") or cluster["worker"])[0].rsplit(":", 1)

    def alive():
        try:
            with socket.create_connection((host, int(port)), timeout=10):
                return True
        except OSError:
            return False

    return alive


def train_dataset_fn(config, global_batch_size, epoch, skip_steps, caches=None):
    """`input_context -> tf.data.Dataset` of per-replica batches of the config's epoch,
    fast-forwarded by `skip_steps` global steps (the data position after a restart); with
    `caches` (feature cache folders), pairs of cached backbone maps instead of images."""
    seed = config.seed * 100003 + epoch  # each epoch draws other pairs

    def dataset_fn(input_context):
        image_shape = (config.image_size, config.image_size, 3)
        if config.data == "synthetic":
            dataset = pipeline.synthetic_pair_dataset(
                input_context.get_per_replica_batch_size(global_batch_size), image_shape=image_shape,
                num_classes=config.num_classes, seed=seed, same_fraction=config.same_fraction,
            )
        elif caches:
            occlusion = None
            if config.occlusion_fraction:
                occlusion = occluded_features.OcclusionSampler(caches, config.occlusion_fraction)
            dataset = features.feature_pair_dataset(
                caches, global_batch_size, same_fraction=config.same_fraction, seed=seed,
                deterministic=config.deterministic, input_context=input_context, shuffle_buffer=config.shuffle_buffer,
                occlusion=occlusion,
            )
        else:
            # The pipeline splits the global batch per replica and the files per input pipeline.
            dataset = pipeline.pair_dataset(
                list(config.train_shards), global_batch_size, same_fraction=config.same_fraction, seed=seed,
                deterministic=config.deterministic, input_context=input_context, shuffle_buffer=config.shuffle_buffer,
                num_classes=config.num_classes, image_shape=image_shape,
            )
        # Each input pipeline feeds its local replicas one batch each per step.
        replicas_per_pipeline = input_context.num_replicas_in_sync // input_context.num_input_pipelines
        return dataset.skip(skip_steps * replicas_per_pipeline)

    return dataset_fn


def centring_maps(config, backbone, caches=None, batch_size=256):
    """Batches of backbone maps `[n, H, W, C]` of up to `config.centre_faces` training faces,
    each face followed by its mirror image (training draws both): the cached maps with
    `caches`, else the `backbone` run on the decoded faces. Faces are taken round-robin over
    the shard files, in a fixed order, so that every shard (every data source) is represented."""
    if caches:
        files, maps_of = features.cached_face_maps(caches)
    else:
        files = pipeline.list_shards(list(config.train_shards))
        image_shape = (config.image_size, config.image_size, 3)

        def maps_of(serialized):
            image = pipeline.decode_image(records.decode_face(serialized)["image_encoded"], image_shape)
            return tf.stack([image, tf.image.flip_left_right(image)])

    faces = tf.data.Dataset.from_tensor_slices(files).interleave(
        tf.data.TFRecordDataset, cycle_length=len(files), block_length=1
    )
    dataset = faces.take(config.centre_faces).map(maps_of, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.unbatch().batch(batch_size).prefetch(1)
    if caches:
        return dataset
    # Eagerly, batch by batch: the backbone's variables may live in a distribution strategy.
    return (backbone(images, training=False) for images in dataset)
