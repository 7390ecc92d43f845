"""The gallery index: one folder holding every enrolled face's grid, summary, person and photo.

Layout of an index folder, version 2 (written by `save`, read by `open_index`):

- `manifest.json`: format version, the model it was enrolled with (folder and a fingerprint of
  its files: grids of another model are not comparable), grid shape and dtype, entry count.
- `entries.json`: one `{"identity", "photo"}` per face, in row order; `rejects.json`: the
  photos where no usable face was found, with the reason (kept, so re-running skips them).
- `grids.npy` float16 [N, h, w, C]: what `compare` re-ranks (cast back to float32 row by row).
  float16 halves the disk and page cache of float32 (12,544 B per 7x7x128 face instead of
  25,088 B) and moved the xCos score by less than 1e-5 on LFW (docs/gallery.md).
- `summaries.npy` float32 [N, C]: each face's grid cells summed and L2-normalised (`summarize`),
  the vectors of the FAISS shortlist: 512 B per face at C = 128 instead of the 25,088 B of the
  flattened embedding, with the same recall on LFW (docs/gallery.md).

Both arrays are memory-mapped when opened: a search reads only its shortlist's grids. A save is
staged: everything is written into a sibling temporary folder, which then replaces the old one
(the old folder is moved aside first and removed last, so a crash leaves either version, never a
mix); the grids are streamed in chunks, so a save never holds the gallery in RAM.

Version 1 (float32 `grids.npy`, float32 `embeddings.npy` instead of summaries) is still read:
its summaries are computed from its grids when it is opened, and the next save (an `enroll`
that adds photos) writes it as version 2.
"""
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
ENTRIES = "entries.json"
REJECTS = "rejects.json"
GRIDS = "grids.npy"
SUMMARIES = "summaries.npy"
GRID_DTYPE = np.float16
CHUNK_ROWS = 4096  # grids per streamed write or summary pass: 51 MB of float32 7x7x128 grids
_EPSILON = 1e-12


class GalleryError(ValueError):
    """A gallery folder that is missing, damaged, of an unknown version, or enrolled with another model."""


def model_fingerprint(model_manifest):
    """sha256 over the export's file list (names, sizes, hashes): changes when the model does."""
    files = json.dumps(model_manifest.get("files", {}), sort_keys=True)
    return hashlib.sha256(files.encode()).hexdigest()


def summarize(grids):
    """float32 [N, C]: the cells of each grid [N, h, w, C] summed, L2-normalised.

    For the shipped model the cells are the teacher's centred partial embeddings (plus a share of
    the whole face's), so their sum is close to the teacher's embedding; for any xCos grid it is
    the global-average-pooled descriptor. Its cosine ranks as well as the flattened grid's."""
    sums = np.asarray(grids, np.float32).sum(axis=(1, 2))
    return sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), _EPSILON)


def stored_grids(grids, grid_shape):
    """float16 [N, *grid_shape] of float grids; `GalleryError` for a value float16 cannot hold."""
    grids = np.asarray(grids, np.float32).reshape(-1, *grid_shape)
    largest, limit = float(np.abs(grids).max()) if grids.size else 0.0, float(np.finfo(GRID_DTYPE).max)
    if not largest <= limit:  # NaN too
        raise GalleryError(f"a grid holds {largest:g}, beyond float16 (max {limit:g}): "
                           "this model's grids cannot be stored in a gallery index")
    return grids.astype(GRID_DTYPE)


@dataclasses.dataclass
class IndexData:
    """What an index folder holds (see the module docstring)."""

    model_dir: str
    fingerprint: str
    grid_shape: tuple
    entries: list  # [{"identity": str, "photo": str}]
    rejects: list  # [{"photo": str, "reason": str}]
    grids: np.ndarray  # float16 [N, h, w, C], memory-mapped (float32 in a version-1 index)
    summaries: np.ndarray  # float32 [N, C], unit norm

    def __post_init__(self):
        self.grid_shape = tuple(int(d) for d in self.grid_shape)
        count = len(self.entries)
        if len(self.summaries) != count or len(self.grids) != count:
            raise GalleryError(
                f"entries ({count}), summaries ({len(self.summaries)}) and grids ({len(self.grids)}) differ in count"
            )
        if count and tuple(self.grids.shape[1:]) != self.grid_shape:
            raise GalleryError(f"grids have shape {self.grids.shape[1:]}, the model's are {self.grid_shape}")

    @classmethod
    def empty(cls, model_dir, fingerprint, grid_shape):
        grid_shape = tuple(int(d) for d in grid_shape)
        return cls(os.path.abspath(model_dir), fingerprint, grid_shape, [], [],
                   np.zeros((0, *grid_shape), GRID_DTYPE), np.zeros((0, grid_shape[-1]), np.float32))

    def known_photos(self):
        return {entry["photo"] for entry in self.entries} | {reject["photo"] for reject in self.rejects}


def _write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=1)


def check_replaceable(index_dir):
    """The absolute path of `index_dir` if a save may replace it: absent, empty, or a gallery index.

    A save replaces the old folder wholesale, so never someone's other folder or file."""
    index_dir = os.path.abspath(os.fspath(index_dir))
    if os.path.exists(index_dir) and not os.path.isfile(os.path.join(index_dir, MANIFEST)) and (
            not os.path.isdir(index_dir) or os.listdir(index_dir)):
        raise GalleryError(f"{index_dir} exists and is not a gallery index: choose a new or empty folder")
    return index_dir


def _open_npy(path, dtype, shape):
    """A .npy file opened for streaming `shape` rows of `dtype` into it (header written)."""
    f = open(path, "wb")
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    return f


def _write_arrays(staging, grid_parts, grid_shape):
    """Streams `grid_parts` (array-likes [n, h, w, C], sliceable) into GRIDS as float16 and their
    summaries into SUMMARIES, CHUNK_ROWS rows at a time."""
    count = sum(len(part) for part in grid_parts)
    with _open_npy(os.path.join(staging, GRIDS), GRID_DTYPE, (count, *grid_shape)) as grids_file, \
            _open_npy(os.path.join(staging, SUMMARIES), np.float32, (count, grid_shape[-1])) as summaries_file:
        for part in grid_parts:
            for start in range(0, len(part), CHUNK_ROWS):
                chunk = stored_grids(part[start:start + CHUNK_ROWS], grid_shape)
                grids_file.write(chunk.tobytes())
                summaries_file.write(summarize(chunk).tobytes())  # of the stored values, as a reader would get


def save(data, index_dir, entries=(), grids=None, rejects=()):
    """Writes `data` plus the added faces as the folder `index_dir`, staged (see the module docstring).

    Args:
        data: `IndexData`, the rows already in the index (memory-mapped; or `IndexData.empty`).
        index_dir: str, the folder to write (absent, empty, or a gallery index).
        entries: the added faces' `{"identity", "photo"}`, in row order.
        grids: the added faces' grids [len(entries), h, w, C], float32 or float16, any
            array-like that slices into arrays (read in chunks; None when nothing is added).
        rejects: the added `{"photo", "reason"}`.
    """
    index_dir = check_replaceable(index_dir)
    entries, rejects = data.entries + list(entries), data.rejects + list(rejects)
    grid_parts = [data.grids] + ([] if grids is None else [grids])
    if sum(len(part) for part in grid_parts) != len(entries):
        raise GalleryError(f"{len(entries)} entries but {sum(len(part) for part in grid_parts)} grids")
    parent = os.path.dirname(index_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(index_dir)}.staging-", dir=parent)
    try:
        _write_arrays(staging, grid_parts, data.grid_shape)
        _write_json(os.path.join(staging, ENTRIES), entries)
        _write_json(os.path.join(staging, REJECTS), rejects)
        _write_json(os.path.join(staging, MANIFEST), {
            "version": VERSION,
            "model": data.model_dir,
            "model_fingerprint": data.fingerprint,
            "grid_shape": list(data.grid_shape),
            "grid_dtype": np.dtype(GRID_DTYPE).name,
            "summaries": "grid cells summed, L2-normalised: the FAISS shortlist's vectors",
            "entries": len(entries),
            "identities": len({entry["identity"] for entry in entries}),
            "rejects": len(rejects),
        })
        old = None
        if os.path.exists(index_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(index_dir)}.old-", dir=parent)
            os.replace(index_dir, os.path.join(old, "index"))
        os.replace(staging, index_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise GalleryError(f"{path}: cannot read ({err})") from None


def _load_array(index_dir, name):
    try:
        return np.load(os.path.join(index_dir, name), mmap_mode="r")
    except (OSError, ValueError) as err:
        raise GalleryError(f"{index_dir}: damaged arrays ({err})") from None


def open_index(index_dir):
    """The `IndexData` of a folder written by `save` (version 2, or 1), arrays memory-mapped."""
    index_dir = os.fspath(index_dir)
    if not os.path.isfile(os.path.join(index_dir, MANIFEST)):
        raise GalleryError(f"{index_dir}: not a gallery index (no {MANIFEST}); make one with "
                           "`python -m xcos_tf.gallery enroll`")
    manifest = _read_json(os.path.join(index_dir, MANIFEST))
    version = manifest.get("version")
    if version not in READABLE_VERSIONS:
        raise GalleryError(
            f"{index_dir}: gallery index version {version}, this xcos_tf reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}: use the xcos_tf that wrote it, or enrol the photos again "
            "into a new folder (python -m xcos_tf.gallery enroll --model DIR --images FOLDER --out NEW_INDEX)"
        )
    grids = _load_array(index_dir, GRIDS)
    if version == 1:  # float32 grids and no summaries: computed here, written by the next save
        summaries = np.concatenate([np.zeros((0, grids.shape[-1]), np.float32)] + [
            summarize(grids[start:start + CHUNK_ROWS]) for start in range(0, len(grids), CHUNK_ROWS)])
    else:
        summaries = _load_array(index_dir, SUMMARIES)
    return IndexData(manifest["model"], manifest["model_fingerprint"], manifest["grid_shape"],
                     _read_json(os.path.join(index_dir, ENTRIES)), _read_json(os.path.join(index_dir, REJECTS)),
                     grids, summaries)
