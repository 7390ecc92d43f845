r"""Trains xCos: `python -m xcos_tf.train --flagfile=xcos_tf/configs/local_mobilefacenet.flags`.

Everything goes into `--model_dir`: `params.json` (the config), `checkpoints/` (every
`--checkpoint_every` steps; the same command resumes after a crash or `kill -9`, which is the
promise of `keras.callbacks.BackupAndRestore`), `logs/` (TensorBoard), `best.keras` (best
evaluation accuracy), `final.keras` and the export. A finished run is not restarted: it says
so and exits 0 (`--overwrite` starts afresh).

The flags are the fields of `xcos_tf.training.config.TrainConfig`; the library entry point is
`xcos_tf.training.loop.train(config)` (see `xcos_tf.training` for the other parts).

Example:

    python -m xcos_tf.train --flagfile=xcos_tf/configs/local_mobilefacenet.flags \
        --model_dir=runs/local
"""
import sys

from absl import app

from xcos_tf.training import config as train_config
from xcos_tf.training import loop


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = train_config.TrainConfig.from_flags()
        config.validate()
        loop.train(config)
    except train_config.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    train_config.define_flags()
    app.run(main)
