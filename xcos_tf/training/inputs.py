"""The training run's data: the shards checked up front (`resolve_data`), the feature caches
of --cache_backbone_features, and the per-replica dataset function of each epoch."""
import dataclasses
import os

import tensorflow as tf

from xcos_tf.data import features, pipeline, records
from xcos_tf.training.config import ConfigError


def resolve_data(config):
    """Checks the shards (corrupt records, labels, teacher embeddings) and fills in
    `num_classes` from them; raises `ConfigError` naming the flag. Reads labels only."""
    if config.eval_pairs:
        num_pairs = sum(_scan("eval_pairs", config.eval_pairs, "pairs").counts)
        if min(num_pairs, config.eval_max_pairs or num_pairs) < 10:
            raise ConfigError("eval_pairs", f"hold too few pairs for 10-fold accuracy: {num_pairs} (--eval_max_pairs={config.eval_max_pairs})")
    if config.data == "shards":
        scan = _scan("train_shards", config.train_shards, "faces", num_classes=config.num_classes or None)
        if scan.teacher_dim == 0:
            raise ConfigError("train_shards", "hold no teacher embeddings: re-create them with make_shards --teacher=PATH")
        return dataclasses.replace(config, num_classes=scan.num_classes)
    return config


def _scan(flag, patterns, kind, **kwargs):
    try:
        return pipeline.scan_shards(list(patterns), kind, **kwargs)
    except (OSError, ValueError) as error:
        raise ConfigError(flag, f"cannot be used: {error}") from None


def feature_caches(config, backbone):
    """--cache_backbone_features: one feature cache per folder of training shards (one make_shards
    run each), written on the first run and reused (or continued) afterwards. Returns their folders."""
    root = config.feature_cache_dir or os.path.join(config.model_dir, "feature_cache")
    files = pipeline.list_shards(list(config.train_shards))
    folders = sorted({os.path.dirname(path) for path in files})
    caches = []
    for index, folder in enumerate(folders):
        cache = os.path.join(root, f"{index:02d}_{os.path.basename(folder)}")
        features.write_feature_shards(backbone, [f for f in files if os.path.dirname(f) == folder], cache)
        caches.append(cache)
    return caches


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
            dataset = features.feature_pair_dataset(
                caches, global_batch_size, same_fraction=config.same_fraction, seed=seed,
                deterministic=config.deterministic, input_context=input_context, shuffle_buffer=config.shuffle_buffer,
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
        manifests = [features.check_cache(cache, kind="faces") for cache in caches]
        shape = tuple(manifests[0]["feature_shape"])
        files = [os.path.join(c, s["file"]) for c, m in zip(caches, manifests) for s in m["shards"]]
        keys = features.FEATURE_FACE_KEYS
        spec = {keys["map"]: tf.io.FixedLenFeature([], tf.string), keys["map_flip"]: tf.io.FixedLenFeature([], tf.string)}

        def maps_of(serialized):
            parsed = tf.io.parse_single_example(serialized, spec)
            return tf.stack([features._parse_map(parsed[keys[key]], shape) for key in ("map", "map_flip")])
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
