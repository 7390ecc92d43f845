"""The one place that knows where the shared data and models folder is.

`$XCOS_SHARED_DIR` when set, else `shared/` beside the repository (`../shared` from its root,
where this project's checkouts live). After a non-editable install there is no such sibling:
set the variable, or give the paths by flag; `require_shared` then says so in one line.
"""
import os

ENV_VAR = "XCOS_SHARED_DIR"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shared_dir():
    """The shared folder: `$XCOS_SHARED_DIR`, else `../shared` from the repository root (may not exist)."""
    return os.path.normpath(os.environ.get(ENV_VAR) or os.path.join(REPO_ROOT, os.pardir, "shared"))


def shared_path(*parts):
    """A path inside the shared folder (not checked)."""
    return os.path.join(shared_dir(), *parts)


def require_shared(*parts, what="shared file"):
    """`shared_path(*parts)`, or `FileNotFoundError` saying what is missing and how to point at it."""
    path = shared_path(*parts)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{what} not found at {path!r}: set {ENV_VAR} to the shared folder, or pass the path by flag."
        )
    return path


# Defaults of the programs' flags; each program checks the file when it needs it.
DEFAULT_DETECTOR = shared_path("models", "yunet.onnx")
DEFAULT_TEACHER = shared_path("models", "teacher_mobilefacenet.onnx")
