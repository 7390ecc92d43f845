"""1:N search: a FAISS shortlist on the faces' summaries, re-ranked by xCos `compare` on the stored grids.

The summary (the grid's cells summed, L2-normalised, `index.summarize`: C numbers, 128 for
the shipped model) is a cheap first pass whose cosine found the right person on LFW as often as
the flattened grid's (6,272 numbers; docs/gallery.md); the xCos score weighs each cell by its
attention, which a single vector product cannot, so the final order comes from `compare` on the
shortlisted grids (stored as float16, compared in float32). A gallery of at most `exact_limit`
faces skips the shortlist: every face is compared (exact xCos ranking).

```python
gallery = Gallery.open("lfw_index")  # loads the model the gallery was enrolled with
hits = gallery.search("probe.jpg", top=5)
hits[0]["identity"], hits[0]["photo"], hits[0]["score"], hits[0]["cos_map"], hits[0]["attention_map"]
```
"""
import logging
import os

import numpy as np

from xcos_tf.gallery import index as index_lib

SHORTLIST = 100
EXACT_LIMIT = 1000  # re-ranking 1000 7x7x128 grids whole: about 0.35 s with onnxruntime on 2 vCPUs
COMPARE_BATCH = 1024
INDEX_TYPES = ("flat", "sq8")


def import_faiss():
    """faiss, without its loader's INFO lines ("Loading faiss with AVX2 support", ...)."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def build_faiss_index(summaries, index_type="flat"):
    """A FAISS inner-product index over unit-norm summaries [N, C] (inner product = cosine).

    `flat` keeps the float32 vectors (exact, 4*C bytes per face); `sq8` an 8-bit scalar
    quantisation (C bytes per face, trained on the vectors themselves) for the largest galleries.
    """
    faiss = import_faiss()
    if index_type not in INDEX_TYPES:
        raise ValueError(f"`index_type` must be one of {INDEX_TYPES}. Received: index_type={index_type!r}")
    dimension = summaries.shape[1]
    if index_type == "flat":
        faiss_index = faiss.IndexFlatIP(dimension)
    else:
        faiss_index = faiss.IndexScalarQuantizer(dimension, faiss.ScalarQuantizer.QT_8bit,
                                                 faiss.METRIC_INNER_PRODUCT)
        faiss_index.train(np.ascontiguousarray(summaries[:100_000], np.float32))
    for start in range(0, len(summaries), 100_000):  # chunks: the memory-mapped file is read once
        faiss_index.add(np.ascontiguousarray(summaries[start:start + 100_000], np.float32))
    return faiss_index


class Gallery:
    """Enrolled faces and the model that compares them.

    Args:
        data: `index.IndexData` (e.g. `index.open_index(folder)`).
        model: `xcos_tf.api.FaceModel` of the model the gallery was enrolled with.
        shortlist: int, how many faces FAISS hands to the xCos re-ranking.
        exact_limit: int, galleries up to this size are re-ranked whole (no shortlist).
        index_type: "flat" or "sq8", see `build_faiss_index`.
    """

    def __init__(self, data, model, shortlist=SHORTLIST, exact_limit=EXACT_LIMIT, index_type="flat"):
        if shortlist < 1:
            raise ValueError(f"`shortlist` must be >= 1. Received: shortlist={shortlist}")
        self.data = data
        self.model = model
        self.shortlist = int(shortlist)
        self.exact_limit = int(exact_limit)
        self._faiss_index = None
        if len(data.entries) > self.exact_limit:
            self._faiss_index = build_faiss_index(data.summaries, index_type)

    @classmethod
    def open(cls, index_dir, model=None, format="saved_model", **kwargs):  # noqa: A002
        """Opens an index folder; loads the model it was enrolled with unless `model` is given."""
        from xcos_tf import api  # TensorFlow only if `format` needs it

        data = index_lib.open_index(index_dir)
        if model is None:
            model = api.load(data.model_dir, format=format)
        fingerprint = index_lib.model_fingerprint(model.runtime.manifest)
        if fingerprint != data.fingerprint:
            raise index_lib.GalleryError(
                f"{index_dir} was enrolled with another model ({data.model_dir}, since re-exported?): its grids "
                f"do not compare with this model's; re-enroll into a new index"
            )
        return cls(data, model, **kwargs)

    def __len__(self):
        return len(self.data.entries)

    def candidates(self, grid):
        """Row numbers to re-rank for one probe grid: all rows for a small gallery, else FAISS's shortlist."""
        if self._faiss_index is None:
            return np.arange(len(self))
        _, rows = self._faiss_index.search(index_lib.summarize(np.asarray(grid)[None]),
                                           min(self.shortlist, len(self)))
        return np.sort(rows[0][rows[0] >= 0])  # sorted: the memory-mapped grids are read in order

    def compare_rows(self, grid, rows):
        """`compare` of one probe grid with the stored grids at `rows`: dict of [len(rows), ...] arrays."""
        outputs = []
        for start in range(0, len(rows), COMPARE_BATCH):
            chunk = rows[start:start + COMPARE_BATCH]
            probe = np.broadcast_to(np.asarray(grid, np.float32), (len(chunk), *self.data.grid_shape))
            outputs.append(self.model.runtime.compare(probe, np.asarray(self.data.grids[chunk], np.float32)))
        return {key: np.concatenate([output[key] for output in outputs]) for key in outputs[0]}

    def search_grid(self, grid, top=5):
        """The best `top` people for one probe grid: their best photo each, best first (see `search`)."""
        if top < 1:
            raise ValueError(f"`top` must be >= 1. Received: top={top}")
        if not len(self):
            return []
        rows = self.candidates(grid)
        outputs = self.compare_rows(grid, rows)
        hits, seen = [], set()
        for position in np.argsort(-outputs["score"], kind="stable"):
            entry = self.data.entries[rows[position]]
            if entry["identity"] in seen:
                continue
            seen.add(entry["identity"])
            hits.append({
                "identity": entry["identity"],
                "photo": entry["photo"],
                "score": float(outputs["score"][position]),
                "cos_map": outputs["cos_map"][position],
                "attention_map": outputs["attention_map"][position],
            })
            if len(hits) == top:
                break
        return hits

    def search(self, photo, top=5):
        """The best `top` gallery people for a photo (path, RGB array or PIL image).

        Returns a list of dicts, best first, one per person (their best-matching photo):
        `identity`, `photo` (the enrolled source photo), `score` (xCos), `cos_map` and
        `attention_map` float32 [h, w]. Raises `ValueError` naming the photo when it has no
        usable face.
        """
        return self.search_grid(self.model.embed(photo)["grid"], top=top)


def hits_json(hits):
    """Hits as JSON-ready dicts (maps as nested lists, 6 decimals)."""
    return [dict(hit, cos_map=np.asarray(hit["cos_map"], np.float64).round(6).tolist(),
                 attention_map=np.asarray(hit["attention_map"], np.float64).round(6).tolist(),
                 score=round(hit["score"], 6)) for hit in hits]


def probe_paths(path, suffixes):
    """A photo, or every photo under a folder (sorted, recursive)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return [path]
    return sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                  for name in names if name.lower().endswith(suffixes))
