"""Verification pair lists: LFW `pairs.txt` files and insightface `.bin` files.

No TensorFlow and no OpenCV here: the evaluation tool and the shard writer both read pairs
through these functions.

LFW: `pairs.txt` (View 2) starts with `10 300`: 10 folds, each 300 same-person lines
`NAME N1 N2` then 300 different-person lines `NAME1 N1 NAME2 N2`; image N of NAME is
`NAME/NAME_000N.jpg`. `pairsDevTrain.txt` / `pairsDevTest.txt` (View 1) start with one count
and form a single fold.

insightface `.bin` (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...): a pickle of
`(list of 2N encoded images, list of N is-same flags)`; pair i is images 2i and 2i+1, and the
10 folds are consecutive blocks of pairs (insightface's `KFold(10, shuffle=False)`). The pickle
is read with an unpickler that can build only lists, tuples, bytes, bools, ints and numpy
arrays: a crafted file cannot run code.
"""
import dataclasses
import io
import os
import pickle

import numpy as np


@dataclasses.dataclass(frozen=True)
class Pair:
    """One verification pair; `path_a`/`path_b` are relative to the images folder."""

    name_a: str
    path_a: str
    name_b: str
    path_b: str
    is_same: bool
    fold: int


def lfw_image_path(name, number):
    return f"{name}/{name}_{int(number):04d}.jpg"


def _parse_header(line, pairs_path):
    try:
        numbers = [int(x) for x in line.split()]
    except ValueError:
        numbers = []
    if len(numbers) == 2:
        return numbers[0], numbers[1]
    if len(numbers) == 1:
        return 1, numbers[0]
    raise ValueError(
        f"{pairs_path}, line 1: expected a header 'FOLDS PAIRS_PER_FOLD' or 'PAIRS'. "
        f"Received: {line.strip()!r}"
    )


def read_lfw_pairs(pairs_path):
    """Parses an LFW pairs file into a list of `Pair` (fold numbers from the positions)."""
    pairs_path = os.fspath(pairs_path)
    with open(pairs_path) as f:
        lines = f.read().splitlines()
    if not lines:
        raise ValueError(f"{pairs_path}: empty pairs file")
    num_folds, per_fold = _parse_header(lines[0], pairs_path)
    body = [(number, line.split()) for number, line in enumerate(lines[1:], start=2) if line.strip()]
    if len(body) != 2 * num_folds * per_fold:
        raise ValueError(
            f"{pairs_path}: the header promises {num_folds} fold(s) of {per_fold} same and "
            f"{per_fold} different pairs ({2 * num_folds * per_fold} lines), found {len(body)}"
        )
    pairs = []
    for position, (number, fields) in enumerate(body):
        fold, within = divmod(position, 2 * per_fold)
        expect_same = within < per_fold
        try:
            if expect_same and len(fields) == 3:
                name, a, b = fields
                pairs.append(Pair(name, lfw_image_path(name, a), name, lfw_image_path(name, b), True, fold))
                continue
            if not expect_same and len(fields) == 4:
                name_a, a, name_b, b = fields
                pairs.append(Pair(name_a, lfw_image_path(name_a, a), name_b, lfw_image_path(name_b, b), False, fold))
                continue
        except ValueError:
            pass
        kind = "same-person 'NAME N1 N2'" if expect_same else "different-person 'NAME1 N1 NAME2 N2'"
        raise ValueError(f"{pairs_path}, line {number}: expected a {kind} line. Received: {' '.join(fields)!r}")
    return pairs


def spread_subset(count, max_count):
    """Indices of at most `max_count` of `count` items, evenly spread (in a pairs file: every
    fold, both kinds of pair; in a sorted image list: most identities), or all of them when
    `max_count` is None."""
    if max_count is None or max_count >= count:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, max_count).round().astype(int))


def people_in_pairs(pairs):
    """Every identity named by these pairs (for keeping them out of training data)."""
    return sorted({p.name_a for p in pairs} | {p.name_b for p in pairs})


_NUMPY_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_NUMPY_SCALAR = np.bool_(True).__reduce__()[0]
# The dtypes of the is-same flags or of image byte arrays in a numpy-made .bin.
_NUMPY_DTYPES = {"b1", "?", "u1", "|b1", "|u1", "bool", "uint8"}


class _BinRefused(pickle.UnpicklingError):
    """A pickle construct that an insightface .bin never holds."""


def _copy_of(kind):
    """bytes / bytearray / list / tuple made only from an object already in the pickle (so its
    size is bounded by the file's): `bytes(10**9)`, `bytearray(10**15)` are refused."""

    def construct(*args):
        if not args:
            return kind()
        value = args[0]
        if not isinstance(value, (bytes, bytearray, str, list, tuple)):
            raise _BinRefused(f"refusing {kind.__name__}({type(value).__name__}): an insightface .bin holds "
                              "only image bytes and is-same flags")
        return kind(*args)

    return construct


def _reconstruct(subtype, shape, dtype_code):
    # numpy pickles an array as an empty one and its state (BUILD), which then checks that the
    # data fills the shape: a non-empty shape here would allocate before any check.
    if subtype is not np.ndarray or tuple(shape) != (0,):
        raise _BinRefused(f"refusing a numpy array of shape {shape!r} before its data")
    return _NUMPY_RECONSTRUCT(subtype, shape, dtype_code)


def _dtype(name, *args):
    if str(name) not in _NUMPY_DTYPES and not (isinstance(name, bytes) and name.decode("latin1") in _NUMPY_DTYPES):
        raise _BinRefused(f"refusing numpy dtype {name!r}: is-same flags are bool, images uint8")
    return np.dtype(name, *args)


def _scalar(dtype, data=None):
    if dtype.itemsize > 8:
        raise _BinRefused(f"refusing a numpy scalar of dtype {dtype}")
    return _NUMPY_SCALAR(dtype, data)


def _encode(text, encoding="utf-8"):
    return text.encode(encoding)  # Python 2 strings in a protocol-2 pickle: the text is in the file


# Everything an insightface .bin pickle (Python 2 or 3, numpy 1 or 2) needs, each bounded by what
# the file holds, and nothing else.
_ALLOWED_GLOBALS = {
    ("builtins", "list"): _copy_of(list),
    ("builtins", "tuple"): _copy_of(tuple),
    ("builtins", "bytes"): _copy_of(bytes),
    ("builtins", "bytearray"): _copy_of(bytearray),
    ("__builtin__", "bytearray"): _copy_of(bytearray),
    ("builtins", "bool"): bool,
    ("_codecs", "encode"): _encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _BinRefused(
                f"refusing to load {module}.{name}: an insightface .bin holds only image bytes "
                "and is-same flags"
            ) from None


def _as_bytes(item, path, index):
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    raise ValueError(f"{path}: image {index} is a {type(item).__name__}, not encoded image bytes")


def read_insightface_bin(path):
    """Reads an insightface `.bin` safely: (list of 2N encoded images, bool array [N])."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        content = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, MemoryError) as e:
        raise ValueError(f"{path}: not a readable insightface .bin pickle ({e})") from None
    if not isinstance(content, (tuple, list)) or len(content) != 2 or not isinstance(content[0], (list, tuple)):
        raise ValueError(f"{path}: expected a pickle of (list of images, is_same flags)")
    images, flags = content
    images = [_as_bytes(item, path, i) for i, item in enumerate(images)]
    if sum(len(image) for image in images) > len(data):
        # Only memo references to one object can hold more bytes than the file: not a real .bin.
        raise ValueError(f"{path}: its images hold more bytes than the file ({len(data)}): repeated references")
    flags = np.asarray(flags)
    if flags.ndim != 1 or not np.all(np.isin(flags, (0, 1))):
        raise ValueError(f"{path}: the is-same flags must be a list of booleans")
    if len(images) != 2 * len(flags):
        raise ValueError(
            f"{path}: {len(images)} images for {len(flags)} pairs; expected two images per pair"
        )
    return images, flags.astype(bool)


def kfold_indices(num_pairs, num_folds=10):
    """Fold of each pair for consecutive folds as `KFold(num_folds, shuffle=False)` makes them."""
    if num_pairs < num_folds:
        raise ValueError(f"{num_pairs} pairs cannot form {num_folds} folds")
    sizes = [num_pairs // num_folds + (1 if i < num_pairs % num_folds else 0) for i in range(num_folds)]
    return np.repeat(np.arange(num_folds), sizes)
