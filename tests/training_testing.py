"""Test helpers of training: a compiled XCosTrainer trained through the project's one training step
(`xcos_tf.training.loop.make_train_step`) on one fixed batch, the training command in a subprocess,
and the counters in a run's checkpoint."""
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

from common_testing import REPO_ROOT
from xcos_tf.data import align, records
from xcos_tf.training import loop


def train_on_batch(trainer, batch, steps):
    """Takes `steps` training steps on `batch` (a dict of arrays); returns the loss of each step."""
    for optimizer, variables in trainer.optimizer_groups():
        optimizer.build(variables)  # as build_model does: the slots exist before the first step
    strategy = tf.distribute.get_strategy()
    train_step = loop.make_train_step(strategy, trainer)
    iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())
    return [float(train_step(iterator)["loss"]) for _ in range(steps)]


def mean_loss(trainer, batch):
    """The loss of `batch` in inference mode (no dropout, BN moving statistics)."""
    return float(trainer.compute_loss_terms(batch, trainer(batch, training=False))["loss"])


def run_python(args, **kwargs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240, **kwargs
    )


def checkpoint_counters(model_dir):
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints"))
    names = reader.get_variable_to_shape_map()
    step = reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")
    iterations = [reader.get_tensor(n) for n in names if n.startswith("optimizers/") and "/_iterations/" in n]
    return int(step), [int(i) for i in iterations]


def shard_faces_and_mirrors(shards):
    """Every face of the face shards in folder `shards` and its mirror image, float32 RGB 0..255."""
    images = []
    for path in sorted(shards.glob("*.tfrecord")):
        for serialized in tf.data.TFRecordDataset(str(path)):
            image = tf.io.decode_image(records.decode_face(serialized)["image_encoded"], channels=3)
            images += [image, tf.image.flip_left_right(image)]
    return np.stack([np.asarray(image, "float32") for image in images])


# The tiny training data of test_train and test_train_start_errors (`write_tiny_training_data`).
IMAGE_SHAPE = (32, 32, 3)


def write_tiny_training_data(root):
    """Tiny face shards (4 identities, 32x32) in `root/faces` and 20 evaluation pairs in 10 folds
    in `root/pairs` (the `data_dir` fixture of conftest.py)."""
    records.write_synthetic_shards(str(root / "faces"), num_shards=2, records_per_shard=16, num_classes=4,
                                   image_shape=IMAGE_SHAPE)
    rng = np.random.default_rng(1)

    def image():
        return align.encode_image(rng.integers(0, 256, IMAGE_SHAPE, dtype=np.uint8), "png")

    os.makedirs(root / "pairs")
    records.write_shard(str(root / "pairs" / records.shard_name("pairs", 0)), [
        records.encode_pair_example(image(), image(), "png", i % 2 == 0, i // 2, "a", "b", "a.png", "b.png")
        for i in range(20)
    ])
    return root
