"""Staged folder writes: a folder is built beside its destination and renamed into place
only when complete, so a failed or killed export never leaves a half folder where a good one stood.

Staging folders are named `.NAME.partial-PID-XXXX` (and `.NAME.previous-PID-XXXX` during the swap):
a killed export leaves one behind, and the next export of NAME removes those whose process is gone.
"""
import contextlib
import errno
import os
import re
import shutil
import tempfile
import time

# Staging folders of earlier versions had no PID in their name: removed once untouched this long
# (no export takes an hour; a live one touches its folder as it writes).
UNNAMED_STALE_SECONDS = 3600
_DISK_FULL = os.strerror(errno.ENOSPC)  # "No space left on device"


class DiskFullError(OSError):
    """The disk filled up during an export; the previous folder (if any) was kept as it was."""


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_staging(parent, base):
    """Removes `.BASE.partial-*` / `.BASE.previous-*` folders in `parent` left by dead processes.

    Returns the removed paths."""
    pattern = re.compile(r"\.%s\.(partial|previous)-(?:(\d+)-)?[^/]+" % re.escape(base))
    removed = []
    for name in os.listdir(parent):
        match = pattern.fullmatch(name)
        path = os.path.join(parent, name)
        if not match or not os.path.isdir(path) or os.path.islink(path):
            continue
        if match.group(2) is not None:
            stale = int(match.group(2)) != os.getpid() and not _process_alive(int(match.group(2)))
        else:
            stale = time.time() - os.path.getmtime(path) > UNNAMED_STALE_SECONDS
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def is_disk_full(error):
    """Whether `error` (an OSError, or TensorFlow's ResourceExhaustedError from a file write)
    says the disk is full."""
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC) or _DISK_FULL in str(error)


@contextlib.contextmanager
def staged_folder(out_dir):
    """Yields a temporary sibling of `out_dir`; on success it replaces `out_dir`.

    On an exception the staging folder is removed and `out_dir` is left as it was (a full disk
    becomes one `DiskFullError` line saying so). Between the two renames (microseconds) `out_dir`
    briefly does not exist; it never holds a half export. Stale staging folders of dead
    processes are removed first.
    """
    out_dir = os.path.abspath(out_dir)
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(parent, base)
    staging = tempfile.mkdtemp(prefix=f".{base}.partial-{os.getpid()}-", dir=parent)
    os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the model from a TF Serving container's user
    try:
        yield staging
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(error):
            kept = f"the previous {out_dir} was kept as it was" if os.path.lexists(out_dir) else f"nothing was written to {out_dir}"
            full = DiskFullError(f"the disk is full (export to {out_dir}): {kept}; free some space and run it again")
            full.errno = errno.ENOSPC
            raise full from None
        raise
    previous = None
    if os.path.lexists(out_dir):
        previous = tempfile.mkdtemp(prefix=f".{base}.previous-{os.getpid()}-", dir=parent)
        os.rename(out_dir, os.path.join(previous, base))
    os.rename(staging, out_dir)
    if previous:
        shutil.rmtree(previous, ignore_errors=True)
