"""The model folder of a run (`--model_dir`): params.json, checkpoints/, logs/, best.keras,
final.keras; and `load_trainer`, which rebuilds a run's trainer from it (for the export)."""
import dataclasses
import glob
import os
import shutil
import tempfile

import tensorflow as tf
from absl import logging

from xcos_tf.training.config import RESUMABLE_FIELDS, ConfigError, TrainConfig
from xcos_tf.training.factory import build_model

WORKER_DIR_PREFIX = "xcos_train_worker_"
PARAMS_FILE = "params.json"
BEST_MODEL = "best.keras"
FINAL_MODEL = "final.keras"


class RunFolder:
    """The model folder of a run: params.json, checkpoints, logs, models.

    Only the chief writes into it; other workers write the same files to a local temporary
    folder that is deleted (all workers must call save, MultiWorkerMirroredStrategy's pattern):
    by `close` on every way out of training, and, after a kill -9, at the next start on the
    machine (`sweep_worker_dirs`: its name holds the process id).
    """

    def __init__(self, config, chief):
        self.config = config
        self.chief = chief
        self.model_dir = config.model_dir
        self.checkpoint_dir = os.path.join(self.model_dir, "checkpoints")
        params_path = os.path.join(self.model_dir, PARAMS_FILE)
        if chief and config.overwrite:
            for name in (PARAMS_FILE, BEST_MODEL, FINAL_MODEL, "checkpoints", "logs"):
                path = os.path.join(self.model_dir, name)
                if tf.io.gfile.isdir(path):
                    tf.io.gfile.rmtree(path)
                elif tf.io.gfile.exists(path):
                    tf.io.gfile.remove(path)
        # A run that never reached its first checkpoint (it failed to start: a bad model file,
        # say) has nothing to resume: the corrected command takes its place, params.json included.
        if tf.io.gfile.exists(params_path) and not config.overwrite and started(self.checkpoint_dir):
            check_same_run(TrainConfig.from_json(params_path), config, params_path)
        if chief:
            self.write_dir = self.model_dir
            tf.io.gfile.makedirs(self.model_dir)
            # Written whole, then renamed: another worker never reads a half-written file.
            with tf.io.gfile.GFile(params_path + ".tmp", "w") as f:
                f.write(config.to_json())
            tf.io.gfile.rename(params_path + ".tmp", params_path, overwrite=True)
        else:
            # A local temporary folder: nothing of this worker lands in --model_dir, even after a kill -9.
            sweep_worker_dirs()
            self.write_dir = tempfile.mkdtemp(prefix=f"{WORKER_DIR_PREFIX}{os.getpid()}_")
            logging.info("Not the chief: this worker's saves go to %s (deleted at the end).", self.write_dir)
        self.summary_writer = (
            tf.summary.create_file_writer(os.path.join(self.model_dir, "logs")) if chief else tf.summary.create_noop_writer()
        )

    def finished(self):
        latest = tf.train.latest_checkpoint(self.checkpoint_dir)
        last_step = int(latest.rsplit("-", 1)[1]) if latest else 0
        return last_step >= self.config.train_steps and tf.io.gfile.exists(os.path.join(self.model_dir, FINAL_MODEL))

    def checkpoint_managers(self, checkpoint):
        return Checkpoints(checkpoint, self.checkpoint_dir, os.path.join(self.write_dir, "checkpoints"), self.config.keep_checkpoints)

    def save_model(self, trainer, name):
        path = os.path.join(self.write_dir, name)
        trainer.save(path)
        if not self.chief:
            tf.io.gfile.remove(path)

    def close(self):
        """Flushes the logs and deletes a non-chief's temporary folder; safe to call twice."""
        self.summary_writer.close()
        if not self.chief:
            shutil.rmtree(self.write_dir, ignore_errors=True)


def started(checkpoint_dir):
    """Whether the run of this checkpoint folder has saved a checkpoint (it really started)."""
    return tf.train.latest_checkpoint(checkpoint_dir) is not None


def sweep_worker_dirs(temp_dir=None):
    """Deletes the temporary folders of non-chief workers whose process is gone (killed before
    `RunFolder.close`). Returns the folders deleted."""
    swept = []
    for path in glob.glob(os.path.join(temp_dir or tempfile.gettempdir(), WORKER_DIR_PREFIX + "*_*")):
        pid = os.path.basename(path)[len(WORKER_DIR_PREFIX):].split("_", 1)[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            swept.append(path)
    return swept


def _process_exists(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class Checkpoints:
    """Restores from the chief's folder; saves into this worker's write folder."""

    def __init__(self, checkpoint, checkpoint_dir, write_dir, keep):
        self.checkpoint = checkpoint
        self.checkpoint_dir = checkpoint_dir
        self.write_dir = write_dir
        self.manager = tf.train.CheckpointManager(checkpoint, write_dir, max_to_keep=keep)

    def restore(self):
        latest = tf.train.latest_checkpoint(self.checkpoint_dir)
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
        return latest

    def save(self, step):
        self.manager.save(checkpoint_number=step)
        if self.write_dir != self.checkpoint_dir:
            tf.io.gfile.rmtree(self.write_dir)


def check_same_run(saved, config, params_path):
    """Raises `ConfigError` when `config` differs from the run `saved` in a field that may not change."""
    different = [
        field.name
        for field in dataclasses.fields(TrainConfig)
        if field.name not in RESUMABLE_FIELDS and getattr(saved, field.name) != getattr(config, field.name)
    ]
    if different:
        changes = ", ".join(f"--{name}={getattr(saved, name)!r} -> {getattr(config, name)!r}" for name in different)
        raise ConfigError(
            different[0],
            f"differs from the run already in {os.path.dirname(params_path)} ({changes}); "
            "use another --model_dir, or --overwrite to start afresh",
        )


def load_trainer(model_dir):
    """The trainer of a run, rebuilt from its params.json, with the latest checkpoint restored."""
    params_path = os.path.join(model_dir, PARAMS_FILE)
    if not tf.io.gfile.exists(params_path):
        raise FileNotFoundError(f"No {PARAMS_FILE} in {model_dir!r}: not a training run folder.")
    config = TrainConfig.from_json(params_path)
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    if not latest:
        raise FileNotFoundError(f"No checkpoint in {os.path.join(model_dir, 'checkpoints')!r}.")
    trainer = build_model(config)
    tf.train.Checkpoint(trainer=trainer).restore(latest).expect_partial().assert_existing_objects_matched()
    return trainer
