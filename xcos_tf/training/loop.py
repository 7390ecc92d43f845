"""The training loop: `make_train_step` (the one training step, for every strategy) and `train`.

One custom loop serves every strategy (default, mirrored, multi_worker): the model and
optimizers are built in `strategy.scope()`, each step runs `strategy.run` on per-replica
batches from `strategy.distribute_datasets_from_function`. (Keras 3.15's `model.fit` fails
under MultiWorkerMirroredStrategy, so the model has no train_step of its own.)
"""
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from xcos_tf import export as xcos_export, progress
from xcos_tf.training.evaluator import Evaluator
from xcos_tf.training.factory import build_model, configure_cpu_devices, is_chief, make_strategy
from xcos_tf.training.in_graph_teacher import load_teacher, teacher_cosine
from xcos_tf.training.inputs import (
    centring_maps, chief_alive, feature_caches, num_input_pipelines, resolve_data, train_dataset_fn,
)
from xcos_tf.training.run_folder import BEST_MODEL, FINAL_MODEL, RunFolder


def make_train_step(strategy, trainer, teacher=None, on_feature_maps=False, jit_compile=False):
    """`iterator -> mean loss terms` of one distributed training step (a tf.function).

    With a `teacher`, teacher_cos is computed in the graph instead of read from the batch.
    With `on_feature_maps`, the batches hold cached backbone maps (`feature_a`, `feature_b`).
    With `jit_compile`, each replica's step (forward, loss, gradients, updates) is XLA-compiled;
    the input iterator stays outside, where XLA cannot go.
    """
    forward = trainer.call_on_feature_maps if on_feature_maps else trainer

    def replica_step(batch):
        if teacher is not None:
            batch = dict(batch, teacher_cos=teacher_cosine(teacher, batch["image_a"], batch["image_b"]))
        with tf.GradientTape(persistent=True) as tape:
            outputs = forward(batch, training=True)
            terms = trainer.compute_loss_terms(batch, outputs)
            # Optimizers sum the replicas' gradients: divide to get the global-batch mean.
            loss = terms["loss"] / strategy.num_replicas_in_sync
        trainer.apply_loss_gradients(tape, loss)
        return {name: tf.cast(value, tf.float32) for name, value in terms.items()}

    if jit_compile:
        replica_step = tf.function(replica_step, jit_compile=True, autograph=False)

    # No tensor-dependent Python control flow here: skipping AutoGraph saves many seconds of tracing.
    @tf.function(autograph=False)
    def train_step(iterator):
        terms = strategy.run(replica_step, args=(next(iterator),))
        return {name: strategy.reduce("MEAN", value, axis=None) for name, value in terms.items()}

    return train_step


def train(config):
    """Trains (or resumes) the run the config describes; returns a dict of per-step loss lists
    (one per loss term of the trainer).

    Raises `ConfigError` for bad values and for a model folder that holds another run.
    """
    config.validate()
    if config.cpu_devices:
        configure_cpu_devices(config.cpu_devices)
    # Before any TensorFlow op (reading the shards is one): MultiWorkerMirroredStrategy must
    # configure the collective ops at program startup.
    strategy = make_strategy(config.strategy)
    config = resolve_data(config, num_input_pipelines(strategy))
    chief = is_chief(strategy)
    run = RunFolder(config, chief)
    try:
        return _train(config, strategy, chief, run)
    finally:
        run.close()  # a non-chief's temporary folder goes on every way out, an error included


def _train(config, strategy, chief, run):
    if run.finished():
        logging.info("The run in %s is finished (step %d); --overwrite starts it afresh.", config.model_dir, config.train_steps)
        if chief and config.export_dir:
            export(config)
        return {}
    keras.utils.set_random_seed(config.seed)
    if config.mixed_precision != "none":
        if config.mixed_precision == "mixed_float16" and not tf.config.list_physical_devices("GPU"):
            logging.warning("--mixed_precision=mixed_float16 without a GPU: float16 on the CPU is slow, not faster.")
        keras.mixed_precision.set_global_policy(config.mixed_precision)
    num_replicas = strategy.num_replicas_in_sync
    global_batch_size = config.batch_size * num_replicas
    with strategy.scope():
        trainer = build_model(config, num_replicas)
        teacher = load_teacher(config.teacher) if config.teacher else None
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        best_accuracy = tf.Variable(-1.0, dtype=tf.float32, trainable=False, name="best_accuracy")
    checkpoint = tf.train.Checkpoint(
        trainer=trainer,
        optimizers=[optimizer for optimizer, _ in trainer.optimizer_groups()],
        step=step,
        best_accuracy=best_accuracy,
    )
    checkpoints = run.checkpoint_managers(checkpoint)
    restored = checkpoints.restore()
    logging.info(
        "%s at step %d: %d replica(s), global batch %d pairs.",
        "Resuming" if restored else "Starting", int(step.numpy()), num_replicas, global_batch_size,
    )

    caches = None
    if config.cache_backbone_features:
        # Only the chief computes the caches; the others wait for them (shared storage).
        caches = feature_caches(config, trainer.backbone, None if chief else chief_alive(strategy))
    # A resumed run restores the centre from its checkpoint, --init_from copies it: only a fresh
    # positionwise head is centred, before step 1 (each worker computes the same mean).
    if config.grid_head == "positionwise" and not restored and not config.init_from:
        centre_grid_head(config, trainer, caches)
    train_step = make_train_step(strategy, trainer, teacher, on_feature_maps=bool(caches), jit_compile=config.jit_compile)
    evaluator = Evaluator(config) if config.eval_pairs and chief else None
    history = {"step": [], "loss": [], "ce_loss": [], "xcos_loss": []}
    progbar = progress.step_bar(config.train_steps, show=chief, stateful_metrics=["lr"])
    start_time, start_step = time.time(), int(step.numpy())
    with run.summary_writer.as_default():
        while int(step.numpy()) < config.train_steps:
            epoch, position = divmod(int(step.numpy()), config.steps_per_epoch)
            dataset = strategy.distribute_datasets_from_function(
                train_dataset_fn(config, global_batch_size, epoch, position, caches)
            )
            iterator = iter(dataset)
            for _ in range(min(config.steps_per_epoch - position, config.train_steps - int(step.numpy()))):
                terms = {name: float(value) for name, value in train_step(iterator).items()}
                step.assign_add(1)
                current = int(step.numpy())
                if not np.isfinite(terms["loss"]):
                    raise FloatingPointError(f"The loss became {terms['loss']} at step {current}; stopping.")
                for name, value in terms.items():
                    history.setdefault(name, []).append(value)
                history["step"].append(current)
                learning_rate = _learning_rate(trainer.optimizer)
                progbar.update(current, [(name, value) for name, value in terms.items()] + [("lr", learning_rate)])
                if current % config.log_every == 0 or current == config.train_steps:
                    _write_scalars(trainer, terms, current, global_batch_size * (current - start_step) * 2 / (time.time() - start_time))
                if evaluator and (current % config.eval_every == 0 or current == config.train_steps):
                    accuracy = evaluator.evaluate(trainer, current)
                    if accuracy > float(best_accuracy.numpy()):
                        best_accuracy.assign(accuracy)
                        run.save_model(trainer, BEST_MODEL)
                        logging.info("New best xCos accuracy %.4f at step %d: saved %s.", accuracy, current, BEST_MODEL)
                # After the evaluation, so that the checkpoint holds the best accuracy so far.
                if current % config.checkpoint_every == 0 or current == config.train_steps:
                    checkpoints.save(current)
    run.save_model(trainer, FINAL_MODEL)
    run.summary_writer.flush()
    if not evaluator:
        run.save_model(trainer, BEST_MODEL)  # without evaluation the last model is the best one known
    run.close()
    if chief:
        export(config)
    _wait_for_all_workers(strategy)
    return history


def centre_grid_head(config, trainer, caches=None):
    """Sets the positionwise grid head's per-cell centre to its mean over up to --centre_faces
    training faces and their mirror images (cached maps with `caches`, else the backbone's)."""
    counted = [0]

    def counting(batches):
        for maps in batches:
            counted[0] += int(maps.shape[0])
            yield maps

    start = time.time()
    trainer.grid_head.adapt(counting(centring_maps(config, trainer.backbone, caches)))
    logging.info(
        "Centred the grid head on %d training faces and their mirror images (%s, %.0f s).",
        counted[0] // 2, "cached maps" if caches else "backbone maps", time.time() - start,
    )
    return counted[0] // 2


def export(config):
    """Exports the run's best model through xcos_tf.export (nothing without --export_formats)."""
    if not config.export_formats:
        return None
    out_dir = config.export_dir or os.path.join(config.model_dir, "export")
    xcos_export.export_model(os.path.join(config.model_dir, BEST_MODEL), out_dir, formats=list(config.export_formats))
    logging.info("Exported %s to %s.", BEST_MODEL, out_dir)
    return out_dir


def _wait_for_all_workers(strategy):
    """A last all-reduce, so that no worker exits while another still works: the chief hosts
    MultiWorkerMirroredStrategy's coordination service, whose loss aborts the others."""

    @tf.function(autograph=False)
    def all_reduce_one():
        return strategy.reduce("SUM", strategy.run(tf.constant, args=(1.0,)), axis=None)

    all_reduce_one()


def _write_scalars(trainer, terms, step, images_per_second):
    for name, value in terms.items():
        tf.summary.scalar(f"train/{name}", value, step=step)
    for optimizer, _ in trainer.optimizer_groups():
        tf.summary.scalar(f"learning_rate/{optimizer.name}", _learning_rate(optimizer), step=step)
    tf.summary.scalar("train/images_per_second", images_per_second, step=step)


def _learning_rate(optimizer):
    # A mirrored variable (or a schedule's tensor): read through a tensor, not float().
    return float(tf.convert_to_tensor(optimizer.learning_rate))
