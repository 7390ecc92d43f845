"""Staged folder writes: a folder is built beside its destination and renamed into place
only when complete, so a failed or killed export never leaves a half folder where a good one stood."""
import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def staged_folder(out_dir):
    """Yields a temporary sibling of `out_dir`; on success it replaces `out_dir`.

    On an exception the staging folder is removed and `out_dir` is left as it was. Between
    the two renames (microseconds) `out_dir` briefly does not exist; it never holds a half export.
    """
    out_dir = os.path.abspath(out_dir)
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{base}.partial-", dir=parent)
    os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the model from a TF Serving container's user
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = None
    if os.path.lexists(out_dir):
        previous = tempfile.mkdtemp(prefix=f".{base}.previous-", dir=parent)
        os.rename(out_dir, os.path.join(previous, base))
    os.rename(staging, out_dir)
    if previous:
        shutil.rmtree(previous, ignore_errors=True)
