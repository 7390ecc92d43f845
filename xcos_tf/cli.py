"""The one command-line convention of every program (`python -m xcos_tf.X`, `tools/*.py`).

- Every user error, absl's flag errors included (unknown flag, bad value or choice, out of
  range, missing required flag or flagfile), is one line `error: ...` on stderr and exit code 2
  (absl alone prints its usage and exits 1).
- TensorFlow's and absl's start-up noise is silenced unless `--verbose` is given: call
  `quiet_startup(__name__)` before TensorFlow is imported (`run` calls it too, for programs
  that import TensorFlow only later). TF 2.21 writes its cudart_stub, cpu_feature_guard and
  "before absl::InitializeLog()" lines from C++ while `import tensorflow` runs, whatever
  TF_CPP_MIN_LOG_LEVEL, GLOG_minloglevel or ABSL_MIN_LOG_LEVEL say (tried: all three set to 3,
  the lines still came): so file descriptor 2 points at /dev/null while that import runs,
  and is restored right after (errors printed later, by Python or by TensorFlow, still show).
- The same shape: `define_flags()` (nothing at import), `main(argv)`, then `cli.run(main)`.
- The flags several programs share are defined here, once: `define_model`, `define_format`,
  `define_detector` and `define_max_megapixels` (with `max_pixels`, its checked value).
"""
import contextlib
import importlib.machinery
import os
import sys

from absl import app, flags

from xcos_tf import paths

# The flags defined here (the shared ones below, --verbose) belong to the program that asks for
# them: absl then lists them in that program's --helpshort, beside its own.
flags.disclaim_key_flags()

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A bad flag, file or value: `run` prints its message as one line and exits 2."""


def _verbose_requested(argv):
    return any(arg in ("--verbose", "--verbose=true", "--verbose=1") for arg in argv[1:])


@contextlib.contextmanager
def native_stderr_hidden():
    """Points file descriptor 2 (where C++ code writes) at /dev/null inside the block; Python's
    `sys.stderr` is flushed first and writes to the same descriptor again afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _QuietImportFinder:
    """A `sys.meta_path` finder that runs the import of `modules` (top-level names) with
    `native_stderr_hidden`; every other import is left to the finders after it."""

    def __init__(self, modules):
        self.modules = set(modules)

    def find_spec(self, name, path=None, target=None):
        if name not in self.modules:
            return None
        self.modules.discard(name)  # once: the import below must not come back here
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def quiet_exec_module(module):
            with native_stderr_hidden():
                exec_module(module)

        spec.loader.exec_module = quiet_exec_module  # this spec's own loader object only
        return spec


NOISY_IMPORTS = ("tensorflow",)


def quiet_startup(module_name, argv=None):
    """For a program's `__main__` (a no-op for imports): hides TensorFlow's C++ and absl's
    start-up logging unless `--verbose`. Must run before TensorFlow is imported."""
    if module_name != "__main__" or _verbose_requested(sys.argv if argv is None else argv):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # C++ INFO, WARNING and ERROR after start-up
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "2")
    pending = [name for name in NOISY_IMPORTS if name not in sys.modules]
    if pending and not any(isinstance(finder, _QuietImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietImportFinder(pending))


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
    quiet_startup("__main__")
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


# === Flags shared by several programs ===
# Each program calls these in its own `define_flags()`; `help_text` says what the flag means
# there when that differs from the common wording; `flag_values` as in absl (tests pass their own).

MODEL_HELP = "Exported model folder (`python -m xcos_tf.export`)."
FORMAT_HELP = "Which of the exported formats to run."
DETECTOR_HELP = "YuNet face detector ONNX file."


def define_model(help_text=MODEL_HELP, default=None, flag_values=flags.FLAGS):
    """`--model`: the exported model to run."""
    return flags.DEFINE_string("model", default, help_text, flag_values=flag_values)


def define_format(help_text=FORMAT_HELP, default="saved_model", flag_values=flags.FLAGS):
    """`--format`: one of the runtime's formats (`xcos_tf.runtime.FORMATS`)."""
    from xcos_tf.manifest_check import KNOWN_FORMATS  # = runtime.FORMATS, without numpy

    return flags.DEFINE_enum("format", default, KNOWN_FORMATS, help_text, flag_values=flag_values)


def define_detector(help_text=DETECTOR_HELP, default=paths.DEFAULT_DETECTOR, flag_values=flags.FLAGS):
    """`--detector`: the YuNet face detector (default: the shared folder's, `xcos_tf.paths`)."""
    return flags.DEFINE_string("detector", default, help_text, flag_values=flag_values)


def define_max_megapixels(flag_values=flags.FLAGS):
    """`--max_megapixels`: the largest photo a program reads; read it with `max_pixels`."""
    from xcos_tf.data import image_io  # OpenCV: only programs that read photos call this

    return flags.DEFINE_float(
        "max_megapixels", image_io.MAX_MEGAPIXELS,
        "Refuse photos of more megapixels than this (width x height from the file's header, checked "
        "before decoding: a small file can claim a huge image). Raise it for large photos.",
        flag_values=flag_values,
    )


def max_pixels(megapixels):
    """The pixel limit (`image_io.read_image`'s `max_pixels`) of a `--max_megapixels` value;
    `UserError` unless it is a finite number > 0."""
    from xcos_tf.data import image_io

    try:
        return image_io.pixel_limit(megapixels)
    except ValueError as error:
        raise UserError(f"--max_megapixels: {error}") from None
