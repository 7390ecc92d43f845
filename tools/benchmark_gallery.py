"""Gallery search: rank-1 on LFW (xCos vs the teacher's cosine), latency and memory at scale, enrolment speed.

    python tools/benchmark_gallery.py [--model exported/default] [--format onnx] \
        [--sizes 10000,100000,1000000] [--skip_scale]

Rank-1: the first 150 LFW people (sorted names) with at least two photos; each person's first
photo (sorted) is enrolled with `xcos_tf.gallery.enroll`, the second is searched with
`Gallery.search` (exact: the whole gallery re-ranked by xCos). The teacher
(`--teacher`, onnxruntime) embeds the same aligned faces and ranks by plain cosine. Rank-1 with a
FAISS shortlist of `--shortlist` is printed beside the exact one.

Scale: galleries of `--sizes` synthetic entries, each grid a fixed mix of three real enrolled
grids (so values are realistic; entries are made on the fly, no 6 GB array is held). Per size:
RAM per entry of the FAISS index (`flat` float32, `sq8` 8-bit) and of the entry records, the
on-disk grid bytes per entry (grids.npy is memory-mapped), and the median latency of one search
(FAISS shortlist + xCos re-ranking of the shortlist) beside brute force (xCos `compare` with
every entry) where `--brute_force_max` allows. Prints the machine and versions.
"""
import os
import pathlib
import platform
import resource
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from tools import machine  # noqa: E402

_MODEL = flags.DEFINE_string("model", str(REPO_ROOT / "exported" / "default"), "Exported model folder.")
_FORMAT = flags.DEFINE_string("format", "onnx", "Runtime format (xcos_tf.runtime.FORMATS).")
_LFW = flags.DEFINE_string("lfw", str(REPO_ROOT.parent / "shared" / "data" / "lfw" / "images"), "LFW images folder.")
_TEACHER = flags.DEFINE_string("teacher", str(REPO_ROOT.parent / "shared" / "models" / "teacher_mobilefacenet.onnx"),
                               "Teacher ONNX model (RGB, (x-127.5)/128, NCHW).")
_PEOPLE = flags.DEFINE_integer("people", 150, "LFW people with at least two photos.")
_SHORTLIST = flags.DEFINE_integer("shortlist", 10, "FAISS shortlist for the shortlisted rank-1 and the scale runs.")
_SIZES = flags.DEFINE_list("sizes", ["10000", "100000"], "Synthetic gallery sizes for latency and memory.")
_MAX_FLAT = flags.DEFINE_integer("max_flat", 200_000, "Largest size also run with the float32 `flat` index.")
_BRUTE_FORCE_MAX = flags.DEFINE_integer("brute_force_max", 100_000, "Largest size also timed by brute force.")
_QUERIES = flags.DEFINE_integer("queries", 20, "Timed searches per size and index type (median reported).")
_FAISS_THREADS = flags.DEFINE_integer("faiss_threads", 1, "FAISS OpenMP threads (one query at a time: 1 is "
                                     "fastest on a small, busy machine; measured 12 ms vs 61 ms at 10k flat).")
_SKIP_SCALE = flags.DEFINE_bool("skip_scale", False, "Only the rank-1 and enrolment part.")


def versions():
    import onnxruntime

    from xcos_tf import runtime
    from xcos_tf.gallery import search

    faiss = search.import_faiss()

    found = {"python": platform.python_version(), "numpy": np.__version__, "faiss": faiss.__version__,
             "onnxruntime": onnxruntime.__version__}
    if _FORMAT.value == "saved_model":
        import tensorflow as tf

        found["tensorflow"] = tf.__version__
    created = runtime.read_manifest(_MODEL.value).get("created", "?")
    return ", ".join(f"{k} {v}" for k, v in found.items()) + f"; model {_MODEL.value} exported {created}"


def lfw_people(lfw_dir, count):
    """[(name, first photo, second photo)] of the first `count` people (sorted) with two photos."""
    people = []
    for name in sorted(os.listdir(lfw_dir)):
        photos = sorted(os.listdir(os.path.join(lfw_dir, name)))
        if len(photos) >= 2:
            people.append((name, os.path.join(lfw_dir, name, photos[0]), os.path.join(lfw_dir, name, photos[1])))
        if len(people) == count:
            break
    return people


def rank_one(model, people, work_dir):
    """Enrols the first photos, searches the second ones; prints rank-1 and enrolment speed."""
    from xcos_tf.gallery import enroll, index, search
    from xcos_tf.teacher import Teacher

    folder = os.path.join(work_dir, "people")
    for name, first, _ in people:
        os.makedirs(os.path.join(folder, name))
        os.symlink(os.path.abspath(first), os.path.join(folder, name, os.path.basename(first)))
    start = time.perf_counter()
    summary = enroll.enroll(model, _MODEL.value, folder, os.path.join(work_dir, "index"), progress=False)
    seconds = time.perf_counter() - start
    print(f"Enrolment: {summary['added']} faces in {seconds:.1f} s = {summary['added'] / seconds:.1f} photos/s "
          f"(read, YuNet, align, embed, staged write); {summary['rejected']} rejects")
    data = index.open_index(os.path.join(work_dir, "index"))
    exact = search.Gallery(data, model)
    shortlisted = search.Gallery(data, model, exact_limit=0, shortlist=_SHORTLIST.value)
    teacher = Teacher(_TEACHER.value)
    enrolled = {entry["identity"]: row for row, entry in enumerate(data.entries)}
    gallery_faces = np.stack([model.align(entry["photo"])[0] for entry in data.entries])
    teacher_gallery = teacher.embed(gallery_faces)
    hits = {"xCos (exact re-ranking)": 0, f"xCos (FAISS shortlist {_SHORTLIST.value})": 0, "teacher cosine": 0}
    searched, start = 0, time.perf_counter()
    for name, _, second in people:
        if name not in enrolled:
            continue
        try:
            probe = model.embed(second)
        except ValueError:
            continue  # no face: counted as a miss for every method
        searched += 1
        for label, gallery in zip(list(hits)[:2], (exact, shortlisted)):
            hits[label] += gallery.search_grid(probe["grid"], probe["embedding"], top=1)[0]["identity"] == name
        best = int(np.argmax(teacher_gallery @ teacher.embed(probe["face"][None])[0]))
        hits["teacher cosine"] += data.entries[best]["identity"] == name
    elapsed = time.perf_counter() - start
    print(f"Rank-1 on {len(people)} LFW people ({summary['added']} enrolled, {searched} probes with a face; "
          f"a person or probe without a face counts as a miss):")
    for label, count in hits.items():
        print(f"  {label:<32} {100.0 * count / len(people):6.2f} %  ({count}/{len(people)})")
    print(f"Search of a real probe photo in the {len(data.entries)}-face gallery (align, embed, rank): "
          f"{1000 * elapsed / max(searched, 1):.0f} ms per probe, all three methods")
    return data


class SyntheticRows:
    """Entry i's grid: pool[i % P] + pool[(i // P) % P] / 2 + pool[(i // P**2) % P] / 4 (computed on access)."""

    def __init__(self, pool, count, normalised):
        self._pool = np.asarray(pool, np.float32)
        self._count = count
        self._normalised = normalised
        size = int(np.prod(self._pool.shape[1:]))
        self.shape = (count, size) if normalised else (count, *self._pool.shape[1:])

    def __len__(self):
        return self._count

    def __getitem__(self, rows):
        rows = np.arange(self._count)[rows] if isinstance(rows, slice) else np.asarray(rows)
        size = len(self._pool)
        grids = (self._pool[rows % size] + self._pool[(rows // size) % size] / 2
                 + self._pool[(rows // size**2) % size] / 4)
        if not self._normalised:
            return grids
        flat = grids.reshape(len(rows), -1)
        return flat / np.linalg.norm(flat, axis=1, keepdims=True)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def median_seconds(function, queries, warm_up=True):
    if warm_up:
        function(0)
    times = []
    for query in range(queries):
        start = time.perf_counter()
        function(query)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def scale(model, data):
    from xcos_tf.gallery import index, search

    pool = np.asarray(data.grids)
    probes = pool + np.random.default_rng(0).normal(0, 0.05, pool.shape).astype(np.float32)
    probe_embeddings = probes.reshape(len(probes), -1) / np.linalg.norm(probes.reshape(len(probes), -1), axis=1,
                                                                         keepdims=True)
    print(f"Scale (synthetic entries from {len(pool)} real grids; shortlist {_SHORTLIST.value}; median of "
          f"{_QUERIES.value} searches; grids.npy on disk: {4 * int(np.prod(pool.shape[1:]))} B per entry, memory-mapped):")
    print(f"  {'entries':>9} {'index':>5} {'build s':>8} {'index B/entry':>14} {'search ms':>10} {'brute force ms':>15}")
    for size in (int(s) for s in _SIZES.value):
        before = rss_bytes()
        entries = [{"identity": f"person_{i:07d}", "photo": f"/photos/person_{i:07d}/0001.jpg"} for i in range(size)]
        records = (rss_bytes() - before) / size
        grids = SyntheticRows(pool, size, normalised=False)
        data_n = index.IndexData(data.model_dir, data.fingerprint, data.grid_shape, entries, [],
                                 SyntheticRows(pool, size, normalised=True), grids)
        brute_ms = None
        if size <= _BRUTE_FORCE_MAX.value:
            everything = np.arange(size)
            brute_ms = 1000 * median_seconds(lambda q: search.Gallery(data_n, model, exact_limit=size).compare_rows(
                probes[q % len(probes)], everything), 1 if size > 10_000 else 3, warm_up=False)
        for index_type in ("flat", "sq8"):
            if index_type == "flat" and size > _MAX_FLAT.value:
                continue
            start = time.perf_counter()
            gallery = search.Gallery(data_n, model, exact_limit=0, shortlist=_SHORTLIST.value, index_type=index_type)
            build = time.perf_counter() - start
            index_bytes = gallery._faiss_index.code_size  # bytes per vector as FAISS stores it
            latency = median_seconds(lambda q: gallery.search_grid(probes[q % len(probes)],
                                                                   probe_embeddings[q % len(probes)]),
                                     _QUERIES.value)
            brute = "not run" if brute_ms is None else f"{brute_ms:.0f}"
            print(f"  {size:>9} {index_type:>5} {build:>8.1f} {index_bytes:>14.0f} {1000 * latency:>10.1f} {brute:>15}")
            del gallery
        print(f"  {'':>9} entry records (identity, photo) in RAM: {records:.0f} B per entry")
        del entries, data_n


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from xcos_tf import api

    print(f"Machine: {machine.describe()}")
    print(f"Load average at start (1/5/15 min): {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"Versions: {versions()}")
    model = api.load(_MODEL.value, format=_FORMAT.value)
    from xcos_tf.gallery import search

    search.import_faiss().omp_set_num_threads(_FAISS_THREADS.value)
    print(f"FAISS threads: {_FAISS_THREADS.value}")
    with tempfile.TemporaryDirectory(prefix="xcos_gallery_bench_") as work_dir:
        data = rank_one(model, lfw_people(_LFW.value, _PEOPLE.value), work_dir)
        if not _SKIP_SCALE.value:
            scale(model, data)
    print(f"Load average at end (1/5/15 min): {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    app.run(main)
