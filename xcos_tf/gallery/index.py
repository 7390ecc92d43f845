"""The gallery index: one folder holding every enrolled face's embedding, grid, person and photo.

Layout of an index folder (written by `save`, read by `open_index`):

- `manifest.json`: format version, the model it was enrolled with (folder and a fingerprint of
  its files: grids of another model are not comparable), grid shape, entry count.
- `entries.json`: one `{"identity", "photo"}` per face, in row order; `rejects.json`: the
  photos where no usable face was found, with the reason (kept, so re-running skips them).
- `embeddings.npy` float32 [N, D] (unit norm, the FAISS shortlist's vectors) and `grids.npy`
  float32 [N, h, w, C] (what `compare` re-ranks), memory-mapped when opened.

A save is staged: everything is written into a sibling temporary folder, which then replaces
the old one (the old folder is moved aside first and removed last, so a crash leaves either
version, never a mix).
"""
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

VERSION = 1
MANIFEST = "manifest.json"
ENTRIES = "entries.json"
REJECTS = "rejects.json"
EMBEDDINGS = "embeddings.npy"
GRIDS = "grids.npy"


class GalleryError(ValueError):
    """A gallery folder that is missing, damaged, or enrolled with another model."""


def model_fingerprint(model_manifest):
    """sha256 over the export's file list (names, sizes, hashes): changes when the model does."""
    files = json.dumps(model_manifest.get("files", {}), sort_keys=True)
    return hashlib.sha256(files.encode()).hexdigest()


@dataclasses.dataclass
class IndexData:
    """What an index folder holds (see the module docstring)."""

    model_dir: str
    fingerprint: str
    grid_shape: tuple
    entries: list  # [{"identity": str, "photo": str}]
    rejects: list  # [{"photo": str, "reason": str}]
    embeddings: np.ndarray  # float32 [N, D]
    grids: np.ndarray  # float32 [N, h, w, C]

    def __post_init__(self):
        self.grid_shape = tuple(int(d) for d in self.grid_shape)
        count = len(self.entries)
        if len(self.embeddings) != count or len(self.grids) != count:
            raise GalleryError(
                f"entries ({count}), embeddings ({len(self.embeddings)}) and grids ({len(self.grids)}) differ in count"
            )
        if count and tuple(self.grids.shape[1:]) != self.grid_shape:
            raise GalleryError(f"grids have shape {self.grids.shape[1:]}, the model's are {self.grid_shape}")

    @classmethod
    def empty(cls, model_dir, fingerprint, grid_shape):
        grid_shape = tuple(int(d) for d in grid_shape)
        size = int(np.prod(grid_shape))
        return cls(os.path.abspath(model_dir), fingerprint, grid_shape, [], [],
                   np.zeros((0, size), np.float32), np.zeros((0, *grid_shape), np.float32))

    def known_photos(self):
        return {entry["photo"] for entry in self.entries} | {reject["photo"] for reject in self.rejects}

    def extended(self, entries, embeddings, grids, rejects):
        """A new `IndexData` with these faces and rejects appended (the arrays are copied in RAM)."""
        return IndexData(
            self.model_dir, self.fingerprint, self.grid_shape,
            self.entries + list(entries), self.rejects + list(rejects),
            np.concatenate([self.embeddings, np.asarray(embeddings, np.float32).reshape(len(entries), self.embeddings.shape[1])]),
            np.concatenate([self.grids, np.asarray(grids, np.float32).reshape(len(entries), *self.grid_shape)]),
        )


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


def save(data, index_dir):
    """Writes `data` as the folder `index_dir`, staged (see the module docstring)."""
    index_dir = check_replaceable(index_dir)
    parent = os.path.dirname(index_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(index_dir)}.staging-", dir=parent)
    try:
        np.save(os.path.join(staging, EMBEDDINGS), np.ascontiguousarray(data.embeddings, np.float32))
        np.save(os.path.join(staging, GRIDS), np.ascontiguousarray(data.grids, np.float32))
        _write_json(os.path.join(staging, ENTRIES), data.entries)
        _write_json(os.path.join(staging, REJECTS), data.rejects)
        _write_json(os.path.join(staging, MANIFEST), {
            "version": VERSION,
            "model": data.model_dir,
            "model_fingerprint": data.fingerprint,
            "grid_shape": list(data.grid_shape),
            "entries": len(data.entries),
            "identities": len({entry["identity"] for entry in data.entries}),
            "rejects": len(data.rejects),
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


def open_index(index_dir, mmap=True):
    """The `IndexData` of a folder written by `save`; arrays memory-mapped unless `mmap=False`."""
    index_dir = os.fspath(index_dir)
    if not os.path.isfile(os.path.join(index_dir, MANIFEST)):
        raise GalleryError(f"{index_dir}: not a gallery index (no {MANIFEST}); make one with "
                           "`python -m xcos_tf.gallery enroll`")
    manifest = _read_json(os.path.join(index_dir, MANIFEST))
    if manifest.get("version") != VERSION:
        raise GalleryError(f"{index_dir}: index version {manifest.get('version')}, this xcos_tf reads {VERSION}")
    try:
        embeddings, grids = (np.load(os.path.join(index_dir, name), mmap_mode="r" if mmap else None)
                             for name in (EMBEDDINGS, GRIDS))
    except (OSError, ValueError) as err:
        raise GalleryError(f"{index_dir}: damaged arrays ({err})") from None
    return IndexData(manifest["model"], manifest["model_fingerprint"], manifest["grid_shape"],
                     _read_json(os.path.join(index_dir, ENTRIES)), _read_json(os.path.join(index_dir, REJECTS)),
                     embeddings, grids)
