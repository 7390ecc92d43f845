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
from xcos_tf import cli

cli.quiet_startup(__name__)  # before TensorFlow is imported

from xcos_tf.training import config as train_config  # noqa: E402
from xcos_tf.training import loop  # noqa: E402


def main(argv):
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = train_config.TrainConfig.from_flags()
        config.validate()
        loop.train(config)
    except train_config.ConfigError as error:
        raise cli.UserError(str(error)) from None


if __name__ == "__main__":
    train_config.define_flags()
    cli.run(main)
