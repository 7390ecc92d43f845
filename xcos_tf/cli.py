"""The one command-line convention of every program (`python -m xcos_tf.X`, `tools/*.py`).

- Every user error, absl's flag errors included (unknown flag, bad value or choice, out of
  range, missing required flag or flagfile), is one line `error: ...` on stderr and exit code 2
  (absl alone prints its usage and exits 1).
- TensorFlow's and absl's start-up noise is silenced unless `--verbose` is given: call
  `quiet_startup(__name__)` before TensorFlow is imported.
- The same shape: `define_flags()` (nothing at import), `main(argv)`, then `cli.run(main)`.
"""
import os
import sys

from absl import app, flags

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A bad flag, file or value: `run` prints its message as one line and exits 2."""


def _verbose_requested(argv):
    return any(arg in ("--verbose", "--verbose=true", "--verbose=1") for arg in argv[1:])


def quiet_startup(module_name, argv=None):
    """For a program's `__main__` (a no-op for imports): hides TensorFlow's C++ and absl's
    start-up logging unless `--verbose`. Must run before TensorFlow is imported."""
    if module_name != "__main__" or _verbose_requested(sys.argv if argv is None else argv):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # C++ INFO, WARNING and ERROR at start-up
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "2")


def fail(message):
    """Exits 2 with `error: message` on one line."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        fail(str(error).splitlines()[0] if str(error) else type(error).__name__)


def run(main):
    """`app.run(main)` with the convention: flag errors and `UserError` exit 2 on one line."""
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, "Show TensorFlow's and absl's start-up logging.")

    def checked_main(argv):
        try:
            return main(argv)
        except UserError as error:
            fail(str(error))
        except app.UsageError as error:
            fail(str(error))

    app.run(checked_main, flags_parser=_parse_flags)
