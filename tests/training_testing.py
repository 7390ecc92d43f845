"""Test helpers that train a compiled XCosTrainer through the project's one training step
(`xcos_tf.training.loop.make_train_step`), on one fixed batch, without a run folder."""
import tensorflow as tf

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
