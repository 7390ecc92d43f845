"""Test helpers of training: a compiled XCosTrainer trained through the project's one training step
(`xcos_tf.training.loop.make_train_step`) on one fixed batch, the training command in a subprocess,
and the counters in a run's checkpoint."""
import os
import subprocess
import sys

import tensorflow as tf

from common_testing import REPO_ROOT
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
