"""Gallery search: rank-1 on LFW (xCos vs the teacher's cosine), latency and memory at scale, enrolment speed.

    nice -n 19 python -m tools.benchmark_gallery [--format onnx] [--people 150] [--distractors] \
        [--sizes 10000,100000,1000000] [--skip_scale]

Rank-1: the first `--people` LFW people (sorted names; 0: all) with at least two photos; each
person's first photo (sorted) is enrolled with `xcos_tf.gallery.enroll` (`--distractors`: also
the only photo of every LFW person with one), the second is searched with `Gallery.search_grid`:
the whole gallery re-ranked by xCos (when it has at most `search.EXACT_LIMIT` faces), and the
FAISS shortlist of `--shortlist` re-ranked by xCos. The teacher (`--teacher`, onnxruntime) embeds
the same aligned faces and ranks by plain cosine. Recall@k (the probe's person among the k
nearest gallery faces) compares the index's shortlist vectors (the 128-d cell sums) with the
flattened grid (the 6,272-d embedding the version-1 index used).

Scale: galleries of `--sizes` synthetic entries, each grid a fixed mix of three real enrolled
grids (realistic values), written to disk by `index.save` (streamed, float16) in `--scale_dir`
and searched memory-mapped, as a real index is. Per size and FAISS index type (`flat` float32
summaries, `sq8` 8-bit): the write speed, the open and FAISS build times, disk and RAM per
entry, the resident memory after the searches (and the run's peak), and the median latency of
one search (FAISS shortlist + xCos re-ranking) beside brute force (xCos `compare` with every
entry) up to `--brute_force_max`. Each size's folder is removed before the next one is written.

Prints the CPU, the versions, the command and the load average with the figures.
"""
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import machine  # noqa: E402
from xcos_tf import cli, paths  # noqa: E402

cli.quiet_startup(__name__)  # before TensorFlow is imported (--format saved_model)

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

RECALL_AT = (1, 10, 100)
FLAGS = flags.FLAGS


def define_flags():
    from xcos_tf import runtime

    flags.DEFINE_string("model", os.path.join(paths.REPO_ROOT, "exported", "default"), "Exported model folder.")
    flags.DEFINE_enum("format", "onnx", runtime.FORMATS, "Which of the exported formats to run.")
    flags.DEFINE_string("detector", paths.DEFAULT_DETECTOR, "YuNet face detector ONNX file.")
    flags.DEFINE_string("lfw", paths.shared_path("data", "lfw", "images"), "LFW images folder (LFW/person/photo.jpg).")
    flags.DEFINE_string("teacher", paths.DEFAULT_TEACHER, "Teacher ONNX model (RGB, (x-127.5)/128, NCHW).")
    flags.DEFINE_integer("people", 150, "LFW people with at least two photos (0: all of them).", lower_bound=0)
    flags.DEFINE_bool("distractors", False, "Also enrol every LFW person with a single photo (never searched).")
    flags.DEFINE_integer("shortlist", 100, "FAISS shortlist for the shortlisted rank-1 and the scale runs.",
                         lower_bound=1)
    flags.DEFINE_list("sizes", ["10000", "100000"], "Synthetic gallery sizes for latency and memory.")
    flags.DEFINE_integer("brute_force_max", 100_000, "Largest size also timed by brute force.", lower_bound=0)
    flags.DEFINE_integer("queries", 20, "Timed searches per size and index type (median reported).", lower_bound=1)
    flags.DEFINE_integer("faiss_threads", 1, "FAISS OpenMP threads (one query at a time: 1 was fastest on a small, "
                         "busy machine; measured 12 ms vs 61 ms at 10k flat).", lower_bound=1)
    flags.DEFINE_string("scale_dir", None, "Folder for the synthetic indexes (about 13 KB per entry with 7x7x128 "
                        "grids: 13 GB at 1M). Default: a temporary folder.")
    flags.DEFINE_bool("skip_scale", False, "Only the rank-1 and enrolment part.")


def versions():
    import onnxruntime

    from xcos_tf import runtime
    from xcos_tf.gallery import search

    found = {"python": platform.python_version(), "numpy": np.__version__,
             "faiss": search.import_faiss().__version__, "onnxruntime": onnxruntime.__version__}
    if FLAGS.format == "saved_model":
        import tensorflow as tf

        found["tensorflow"] = tf.__version__
    created = runtime.read_manifest(FLAGS.model).get("created", "?")
    return ", ".join(f"{k} {v}" for k, v in found.items()) + f"; model {FLAGS.model} exported {created}"


def lfw_people(lfw_dir, count, distractors):
    """[(name, first photo, second photo or None)]: the first `count` people (sorted; 0: all) with two
    photos, plus every person with one photo when `distractors`."""
    if not os.path.isdir(lfw_dir):
        raise cli.UserError(f"--lfw {lfw_dir}: not a folder (LFW/person/photo.jpg)")
    people, searched = [], 0
    for name in sorted(os.listdir(lfw_dir)):
        photos = [os.path.join(lfw_dir, name, photo) for photo in sorted(os.listdir(os.path.join(lfw_dir, name)))]
        if len(photos) >= 2 and (not count or searched < count):
            people.append((name, photos[0], photos[1]))
            searched += 1
        elif len(photos) == 1 and distractors:
            people.append((name, photos[0], None))
    return people


def recall(scores, truth):
    """{k: share of probes whose true gallery row is among the k highest `scores` [probes, gallery]}."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return {k: float(np.mean([row in order[q, :k] for q, row in enumerate(truth)])) for k in RECALL_AT}


def _unit(vectors):
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def rank_one(model, people, work_dir):
    """Enrols the first photos, searches the second ones; prints enrolment speed, rank-1 and recall."""
    from xcos_tf.gallery import enroll, index, search
    from xcos_tf.teacher import Teacher

    folder = os.path.join(work_dir, "people")
    for name, first, _ in people:
        os.makedirs(os.path.join(folder, name))
        os.symlink(os.path.abspath(first), os.path.join(folder, name, os.path.basename(first)))
    start = time.perf_counter()
    summary = enroll.enroll(model, FLAGS.model, folder, os.path.join(work_dir, "index"), progress=False)
    seconds = time.perf_counter() - start
    print(f"Enrolment: {summary['added']} faces in {seconds:.1f} s = {summary['added'] / seconds:.1f} photos/s "
          f"(read, YuNet, align, embed, staged write); {summary['rejected']} rejects")
    data = index.open_index(os.path.join(work_dir, "index"))
    exact = search.Gallery(data, model) if len(data.entries) <= search.EXACT_LIMIT else None
    shortlisted = search.Gallery(data, model, exact_limit=0, shortlist=FLAGS.shortlist)
    row_of = {entry["identity"]: row for row, entry in enumerate(data.entries)}
    probes = [(name, second) for name, _, second in people if second]
    methods = ["xCos, whole gallery re-ranked", f"xCos, FAISS shortlist of {FLAGS.shortlist} re-ranked",
               "teacher cosine"]
    hits, probe_grids, probe_faces, truth = dict.fromkeys(methods, 0), [], [], []
    start = time.perf_counter()
    for name, second in probes:
        if name not in row_of:
            continue  # no enrolled face: a miss for every method
        try:
            probe = model.embed(second)
        except ValueError:
            continue  # no face: a miss for every method
        probe_grids.append(probe["grid"])
        probe_faces.append(probe["face"])
        truth.append(row_of[name])
        for label, gallery in zip(methods[:2], (exact, shortlisted)):
            hits[label] += gallery is not None and gallery.search_grid(probe["grid"], top=1)[0]["identity"] == name
    per_probe = (time.perf_counter() - start) / max(len(truth), 1)
    teacher = Teacher(FLAGS.teacher)
    gallery_faces = np.stack([model.align(entry["photo"])[0] for entry in data.entries])
    teacher_scores = teacher.embed(np.stack(probe_faces)) @ teacher.embed(gallery_faces).T
    hits["teacher cosine"] = int(np.sum(np.argmax(teacher_scores, axis=1) == truth))
    print(f"Rank-1 on {len(probes)} LFW people, {len(data.entries)} faces enrolled "
          f"({len(data.entries) - len(probes)} distractors), {len(truth)} probes with a face (a person or probe "
          "without a face counts as a miss):")
    for label, count in hits.items():
        result = "not run (gallery > exact limit)" if label == methods[0] and exact is None else \
            f"{100.0 * count / len(probes):6.2f} %  ({count}/{len(probes)})"
        print(f"  {label:<40} {result}")
    print(f"Search of a real probe photo (align, embed, both xCos searches): {1000 * per_probe:.0f} ms per probe")
    probe_grids = np.stack(probe_grids)
    true_faces = gallery_faces[truth]  # the enrolled faces again, embedded in float32
    float32_grids = np.concatenate([model.runtime.embed(true_faces[start:start + 64])["grid"]
                                    for start in range(0, len(true_faces), 64)])
    change = np.abs(model.runtime.compare(probe_grids, float32_grids)["score"]
                    - model.runtime.compare(probe_grids, np.asarray(data.grids[truth], np.float32))["score"])
    print(f"float16 storage: the xCos score of the {len(truth)} probe / true-person pairs moved by at most "
          f"{change.max():.1e} (mean {change.mean():.1e}) against the same faces' float32 grids")
    flat = _unit(np.asarray(data.grids, np.float32).reshape(len(data.entries), -1))
    vectors = {"cell sums (the index's summaries)": (index.summarize(probe_grids) @ np.asarray(data.summaries).T),
               "flattened grid (version-1 embedding)": _unit(probe_grids.reshape(len(truth), -1)) @ flat.T,
               "teacher embedding (reference)": teacher_scores}
    print(f"Recall@k of the shortlist vectors (share of probes whose person is among the k nearest, of {len(truth)}):")
    for label, scores in vectors.items():
        print(f"  {label:<40} " + "  ".join(f"@{k}: {100 * value:6.2f} %" for k, value in recall(scores, truth).items()))
    return data


class SyntheticGrids:
    """Entry i's grid: pool[i % P] + pool[(i // P) % P] / 2 + pool[(i // P**2) % P] / 4 (made on access)."""

    def __init__(self, pool, count):
        self._pool = np.asarray(pool, np.float32)
        self._count = count
        self.shape = (count, *self._pool.shape[1:])

    def __len__(self):
        return self._count

    def __getitem__(self, rows):
        rows = np.arange(*rows.indices(self._count)) if isinstance(rows, slice) else np.asarray(rows)
        size = len(self._pool)
        return (self._pool[rows % size] + self._pool[(rows // size) % size] / 2
                + self._pool[(rows // size**2) % size] / 4)


def memory_status(*keys):
    """Bytes of these /proc/self/status fields (RssAnon: RAM this process owns; RssFile: mapped file
    pages it has resident, clean and reclaimable for a read-only memory map; VmHWM: peak of both)."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                found[key] = int(value.split()[0]) * 1024
    return tuple(found[key] for key in keys)


def median_seconds(function, queries):
    function(0)  # warm-up
    times = []
    for query in range(queries):
        start = time.perf_counter()
        function(query)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def scale_one(model, data, probes, size, folder):
    """Writes, opens and times one synthetic index of `size` entries; prints its rows of the table."""
    from xcos_tf.gallery import index, search

    entries = [{"identity": f"person_{i:07d}", "photo": f"/photos/person_{i:07d}/0001.jpg"} for i in range(size)]
    start = time.perf_counter()
    index.save(index.IndexData.empty(data.model_dir, data.fingerprint, data.grid_shape), folder,
               entries=entries, grids=SyntheticGrids(data.grids, size))
    write = time.perf_counter() - start
    del entries
    disk = {name: os.path.getsize(os.path.join(folder, name)) / size
            for name in (index.GRIDS, index.SUMMARIES, index.ENTRIES)}
    print(f"  {size:>9,} entries written in {write:.0f} s = {size / write:,.0f} entries/s (synthetic grids, float16, "
          f"streamed); disk per entry: grids {disk[index.GRIDS]:,.0f} B, summaries {disk[index.SUMMARIES]:,.0f} B, "
          f"entries.json {disk[index.ENTRIES]:,.0f} B")
    anon_before, = memory_status("RssAnon")
    start = time.perf_counter()
    opened = index.open_index(folder)
    print(f"  {size:>9,} opened in {time.perf_counter() - start:.1f} s (entries.json read, arrays memory-mapped)")
    for index_type in search.INDEX_TYPES:
        start = time.perf_counter()
        gallery = search.Gallery(opened, model, exact_limit=0, shortlist=FLAGS.shortlist, index_type=index_type)
        build = time.perf_counter() - start
        latency = median_seconds(lambda q: gallery.search_grid(probes[q % len(probes)]), FLAGS.queries)
        anon, file_backed = memory_status("RssAnon", "RssFile")
        print(f"  {size:>9,} {index_type:>5} {build:>7.1f} {gallery._faiss_index.code_size:>8} "
              f"{(anon - anon_before) / size:>11,.0f} {anon / 2**30:>8.2f} {file_backed / 2**30:>8.2f} "
              f"{1000 * latency:>9.1f}")
        del gallery
    if size <= FLAGS.brute_force_max:  # after the memory figures: it touches every grid
        everything, queries = np.arange(size), 3 if size <= 10_000 else 1
        brute_force = search.Gallery(opened, model, exact_limit=size)
        start = time.perf_counter()
        for q in range(queries):
            brute_force.compare_rows(probes[q], everything)
        print(f"  {size:>9,} brute force (xCos compare with every entry): "
              f"{1000 * (time.perf_counter() - start) / queries:,.0f} ms per search")


def scale(model, data, scale_dir):
    pool = np.asarray(data.grids, np.float32)
    probes = pool + np.random.default_rng(0).normal(0, 0.05, pool.shape).astype(np.float32)
    print(f"Scale (synthetic entries from {len(pool)} real grids {'x'.join(map(str, data.grid_shape))}; shortlist "
          f"{FLAGS.shortlist}; median of {FLAGS.queries} searches; brute force: 3 queries at <= 10k, else 1). "
          "RAM/entry: anonymous RAM the opened index and its FAISS index added (entries, FAISS vectors); "
          "RSS: this process's anonymous / file-backed (memory-mapped index pages) resident GB after the searches:")
    print(f"  {'entries':>9} {'index':>5} {'build s':>7} {'FAISS B':>8} {'RAM B/entry':>11} {'RSS anon':>8} "
          f"{'RSS file':>8} {'search ms':>9}")
    for size in (int(s) for s in FLAGS.sizes):
        folder = os.path.join(scale_dir, f"synthetic_{size}")
        try:
            scale_one(model, data, probes, size, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _load_average():
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv):
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        sizes = [int(size) for size in FLAGS.sizes]
    except ValueError:
        raise cli.UserError(f"--sizes must be whole numbers. Received: {','.join(FLAGS.sizes)}") from None
    if any(size < 1 for size in sizes):
        raise cli.UserError(f"--sizes must be positive. Received: {','.join(FLAGS.sizes)}")
    for flag in ("lfw", "teacher"):
        if not os.path.exists(FLAGS[flag].value):
            raise cli.UserError(f"--{flag} {FLAGS[flag].value}: not found (set {paths.ENV_VAR} or pass the path)")
    from xcos_tf import api
    from xcos_tf.gallery import search

    try:
        model = api.load(FLAGS.model, format=FLAGS.format, detector=FLAGS.detector)
    except (OSError, ValueError) as err:
        raise cli.UserError(f"--model {FLAGS.model}: {err}") from None
    print(f"Machine: {machine.describe()}")
    print(f"Versions: {versions()}")
    print(f"Command: python -m tools.benchmark_gallery {shlex.join(sys.argv[1:])}")
    print(f"Load average at start (1/5/15 min): {_load_average()}")
    search.import_faiss().omp_set_num_threads(FLAGS.faiss_threads)
    print(f"FAISS threads: {FLAGS.faiss_threads}")
    with tempfile.TemporaryDirectory(prefix="xcos_gallery_bench_") as work_dir:
        data = rank_one(model, lfw_people(FLAGS.lfw, FLAGS.people, FLAGS.distractors), work_dir)
        if not FLAGS.skip_scale:
            if FLAGS.scale_dir:
                os.makedirs(FLAGS.scale_dir, exist_ok=True)
            scale(model, data, FLAGS.scale_dir or work_dir)
    print(f"Peak resident memory of this run (VmHWM, anonymous + file-backed): "
          f"{memory_status('VmHWM')[0] / 2**30:.2f} GB")
    print(f"Load average at end (1/5/15 min): {_load_average()}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
