"""Writing shard sets: inputs -> prepared faces (worker processes) -> shards + manifest.json.

The library behind `tools/make_shards.py` (its docstring shows the commands). Faces are prepared
in parallel worker processes (`prepare.py`); records are written in a fixed order, so a re-run
writes byte-identical shards. Each shard is written under a temporary name and renamed;
`manifest.json` lists finished shards with their sha256 as they complete, so re-running an
interrupted command verifies those and continues after them.
"""
import dataclasses
import hashlib
import json
import multiprocessing
import os

import numpy as np
from absl import logging

from xcos_tf import progress as progress_lib
from xcos_tf.data import align, image_io, pairs as pairs_lib, prepare, records

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Settings whose change makes existing shards in --out_dir stale.
_CONFIG_KEYS = ("kind", "input", "alignment", "teacher", "image_format", "jpeg_quality",
                "shard_mb", "shuffle_seed", "prefix", "classes")
_RECORD_OVERHEAD = 16  # TFRecord framing: length, its CRC, data CRC


# === Inputs ===

def _is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_folder(root, unlabelled=False):
    """[(relative path, identity)] of an ImageFolder tree, sorted. Identity = first folder
    below `root`; with `unlabelled`, every image anywhere below `root` with identity None."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--input: no such folder {root!r}")
    items = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders.sort()
        relative_folder = os.path.relpath(folder, root)
        for name in sorted(files):
            if not _is_image(name):
                continue
            path = os.path.normpath(os.path.join(relative_folder, name))
            if unlabelled:
                items.append((path, None))
            elif relative_folder != ".":
                items.append((path, path.split(os.sep)[0]))
    if not items:
        hint = "" if unlabelled else " in identity subfolders (ROOT/IDENTITY/photo.jpg; --unlabelled for a flat folder)"
        raise ValueError(f"--input: no images{hint} under {root!r}")
    return sorted(items)


def read_list_file(path):
    """[(relative path, identity or None)] from `relative/path label` lines (label -1: none)."""
    items = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.rsplit(maxsplit=1)
            if len(fields) != 2:
                raise ValueError(f"{path}, line {number}: expected 'relative/path label'. Received: {line!r}")
            items.append((fields[0], None if fields[1] == str(records.UNLABELLED) else fields[1]))
    if not items:
        raise ValueError(f"{path}: no 'relative/path label' lines")
    return items


def _sha256_lines(lines):
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


# === Preparing faces in worker processes ===

def _prepare_all(settings, items, num_workers):
    """Yields prepare.PreparedFace / prepare.Reject for each (name, path or bytes), in order."""
    if num_workers <= 1:
        preparer = prepare.FacePreparer(settings)
        for name, source in items:
            yield preparer.prepare(name, source)
        return
    # spawn, not fork: the parent may hold TensorFlow threads that a fork would copy broken.
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_workers, initializer=prepare.init_worker, initargs=(settings,)) as pool:
        yield from pool.imap(prepare.prepare_in_worker, items, chunksize=8)


def _progress(iterable, total, initial, description, show):
    return progress_lib.bar(iterable, total=total, initial=initial, description=description, unit="img", show=show)


# === Shard sets that survive interruption ===

class ShardSet:
    """Shards of one run in `out_dir`: resumes after verified shards, rolls shards by size.

    `manifest.json` is rewritten (atomically) after each finished shard with `complete: false`
    and the index `end` of the first unit not yet in a shard; the final write sets
    `complete: true`.
    """

    def __init__(self, out_dir, config, target_bytes, overwrite=False):
        self.out_dir = os.fspath(out_dir)
        self.config = json.loads(json.dumps(config))  # the JSON form, as it is compared later
        self.target_bytes = target_bytes
        self.shards, self.rejects = [], []
        self.complete = False
        self._pending, self._pending_bytes = [], 0
        os.makedirs(self.out_dir, exist_ok=True)
        manifest = records.read_manifest(self.out_dir)
        if manifest is not None:
            changed = [k for k in _CONFIG_KEYS if manifest.get(k) != self.config.get(k)]
            if changed and not overwrite:
                raise ValueError(
                    f"{self.out_dir} holds shards made with other settings ({', '.join(changed)} "
                    "differ). Use another --out_dir, or --overwrite to replace them."
                )
            if not changed:
                self._resume(manifest)
        self._remove_stray_files()

    @property
    def start(self):
        """Index of the first unit that is not in a verified shard."""
        return self.shards[-1]["end"] if self.shards else 0

    def _resume(self, manifest):
        for entry in manifest.get("shards", []):
            path = os.path.join(self.out_dir, entry["file"])
            if not os.path.isfile(path) or records.sha256_file(path) != entry["sha256"]:
                logging.warning("%s is missing or differs from its checksum: rewriting from there", path)
                break
            self.shards.append(entry)
        else:
            self.complete = bool(manifest.get("complete"))
        self.rejects = [r for r in manifest.get("rejects", []) if r["index"] < self.start]
        if self.shards and not self.complete:
            logging.info("Resuming after %d verified shard(s), at unit %d", len(self.shards), self.start)

    def _remove_stray_files(self):
        """Shards not (or no longer) listed, and temporary files of a killed run."""
        keep = {entry["file"] for entry in self.shards}
        prefix = self.config["prefix"] + "-"
        for name in os.listdir(self.out_dir):
            stray_shard = name.startswith(prefix) and name.endswith(records.SHARD_SUFFIX) and name not in keep
            if stray_shard or name.endswith(".tmp"):
                os.remove(os.path.join(self.out_dir, name))

    def add(self, index, record):
        self._pending.append(record)
        self._pending_bytes += len(record) + _RECORD_OVERHEAD
        if self._pending_bytes >= self.target_bytes:
            self._flush(end=index + 1)

    def reject(self, index, name, rejected):
        self.rejects.append({"index": index, "path": name, "reason": rejected.reason, "detail": rejected.detail})

    def _flush(self, end):
        path = os.path.join(self.out_dir, records.shard_name(self.config["prefix"], len(self.shards)))
        try:
            entry = records.write_shard(path, self._pending)
            entry["end"] = end
            self.shards.append(entry)
            self._pending, self._pending_bytes = [], 0
            self._write_manifest({}, complete=False)
        except records.DiskFullError as e:
            kept = (records.read_manifest(self.out_dir) or {}).get("shards", [])
            raise records.DiskFullError(
                f"{e.strerror}; kept: the {len(kept)} finished shard(s) listed in "
                f"{os.path.join(self.out_dir, records.MANIFEST_NAME)}; free space and run the same command to resume"
            ) from None

    def _write_manifest(self, summary, complete):
        reject_counts = {}
        for r in self.rejects:
            reject_counts[r["reason"]] = reject_counts.get(r["reason"], 0) + 1
        manifest = dict(self.config, **summary)
        manifest.update({
            "complete": complete,
            "num_records": sum(s["records"] for s in self.shards),
            "shards": self.shards,
            "rejects": self.rejects,
            "reject_counts": reject_counts,
        })
        records.write_json_atomic(os.path.join(self.out_dir, records.MANIFEST_NAME), manifest)
        return manifest

    def finish(self, num_units, summary):
        if self._pending:
            self._flush(end=num_units)
        self.complete = True
        return self._write_manifest(summary, complete=True)


# === Configurations ===

def _alignment_config(settings):
    detector = settings.detector
    config = {
        "detector": os.path.basename(detector) if detector else None,
        "detector_sha256": records.sha256_file(detector) if detector else None,
        "choose": settings.choose,
        "min_face_size": settings.min_face_size,
        "score_threshold": settings.score_threshold,
        "assume_aligned": settings.assume_aligned,
        "template_112": align.TEMPLATE_112.tolist(),
    }
    if settings.detect_padding:
        # Only when used: shard sets made before the option keep matching their settings.
        config["detect_padding"] = settings.detect_padding
    if settings.max_pixels != image_io.MAX_PIXELS:
        # Only when raised or lowered, likewise: the limit decides which images are rejects.
        config["max_pixels"] = settings.max_pixels
    return config


def _teacher_config(teacher):
    """The teacher's declared preprocessing and embedding size, or None."""
    if teacher is None:
        return None
    config = teacher.get_config()
    config["dim"] = int(teacher.embed(np.zeros((1, *teacher.image_size, 3), np.uint8)).shape[1])
    if os.path.isfile(teacher.path):
        config["sha256"] = records.sha256_file(teacher.path)
    return config


def _base_config(kind, settings, input_config, shard_mb, prefix):
    # Building a preparer here reports a missing detector or teacher before any worker starts.
    preparer = prepare.FacePreparer(settings)
    if settings.image_format not in ("jpeg", "png"):
        raise ValueError(f"--image_format must be jpeg or png. Received: {settings.image_format!r}")
    if shard_mb <= 0:
        raise ValueError(f"--shard_mb must be > 0. Received: {shard_mb}")
    return {
        "kind": kind,
        "input": input_config,
        "alignment": _alignment_config(settings),
        "teacher": _teacher_config(preparer.teacher),
        "image_format": settings.image_format,
        "jpeg_quality": settings.jpeg_quality,
        "shard_mb": shard_mb,
        "prefix": prefix,
    }


def _finished(shard_set, out_dir):
    if shard_set.complete:
        logging.info("%s is complete and its shards match their checksums: nothing to do", out_dir)
        return records.read_manifest(out_dir)
    return None


# === Face shards (training) ===

def make_face_shards(items, root, out_dir, settings, shard_mb=100.0, num_workers=None,
                     prefix="train", shuffle_seed=0, source=None, overwrite=False, progress=True):
    """Aligns the images of `items` [(relative path, identity or None)] below `root` and writes
    face shards and `manifest.json` into `out_dir`. Returns the manifest.

    Identities get labels 0..C-1 in sorted order; None -> -1. `shuffle_seed` fixes the record
    order (a seeded permutation, so that shards mix identities); None keeps the sorted order.
    """
    items = sorted(items, key=lambda item: (item[0], item[1] or ""))
    classes = sorted({identity for _, identity in items if identity is not None})
    label_of = {identity: label for label, identity in enumerate(classes)}
    if shuffle_seed is not None:
        items = [items[i] for i in np.random.default_rng(shuffle_seed).permutation(len(items))]
    input_config = {
        "source": os.fspath(source or root),
        "num_images": len(items),
        "items_sha256": _sha256_lines(f"{path}\t{identity}" for path, identity in items),
    }
    config = _base_config("faces", settings, input_config, shard_mb, prefix)
    config.update({"classes": classes, "num_classes": len(classes), "shuffle_seed": shuffle_seed})
    shard_set = ShardSet(out_dir, config, shard_mb * 1e6, overwrite)
    done = _finished(shard_set, out_dir)
    if done is not None:
        return done

    start = shard_set.start
    todo = [(path, os.path.join(root, path)) for path, _ in items[start:]]
    results = _prepare_all(settings, todo, num_workers or os.cpu_count() or 1)
    for index, result in enumerate(_progress(results, len(items), start, "faces", progress), start):
        path, identity = items[index]
        if isinstance(result, prepare.Reject):
            shard_set.reject(index, path, result)
            continue
        shard_set.add(index, records.encode_face_example(
            result.encoded, settings.image_format, label_of.get(identity, records.UNLABELLED),
            identity or "", path, result.landmarks, result.teacher_embedding,
            result.teacher_embedding_flip,
        ))
    rejected = {r["index"] for r in shard_set.rejects}
    images_per_class = [0] * len(classes)
    for index, (_, identity) in enumerate(items):
        if identity is not None and index not in rejected:
            images_per_class[label_of[identity]] += 1
    unlabelled = sum(1 for i, (_, identity) in enumerate(items) if identity is None and i not in rejected)
    return shard_set.finish(len(items), {"images_per_class": images_per_class, "num_unlabelled": unlabelled})


# === Pair shards (evaluation) ===

def _write_pairs(pair_list, images, out_dir, settings, config, shard_mb, num_workers, overwrite, progress):
    """pair_list: [pairs_lib.Pair]; images: {image name: path or bytes} for every pair image."""
    config["num_pairs"] = len(pair_list)
    shard_set = ShardSet(out_dir, config, shard_mb * 1e6, overwrite)
    done = _finished(shard_set, out_dir)
    if done is not None:
        return done
    todo = pair_list[shard_set.start:]
    names = sorted({p.path_a for p in todo} | {p.path_b for p in todo})
    results = _prepare_all(settings, [(name, images[name]) for name in names], num_workers or os.cpu_count() or 1)
    prepared = dict(zip(names, _progress(results, len(names), 0, "pair images", progress)))
    image_rejects = {}
    for index, pair in enumerate(todo, shard_set.start):
        face_a, face_b = prepared[pair.path_a], prepared[pair.path_b]
        rejected = next((f for f in (face_a, face_b) if isinstance(f, prepare.Reject)), None)
        if rejected is not None:
            # The pair is dropped; the evaluation reports how many (num_pairs - num_records).
            failed = pair.path_a if isinstance(face_a, prepare.Reject) else pair.path_b
            shard_set.reject(index, failed, rejected)
            image_rejects[failed] = rejected.reason
            continue
        shard_set.add(index, records.encode_pair_example(
            face_a.encoded, face_b.encoded, settings.image_format, pair.is_same, pair.fold,
            pair.name_a, pair.name_b, pair.path_a, pair.path_b,
            face_a.teacher_embedding, face_b.teacher_embedding,
        ))
    folds = sorted({p.fold for p in pair_list})
    return shard_set.finish(len(pair_list), {
        "num_folds": len(folds),
        "num_same": sum(p.is_same for p in pair_list),
    })


def make_lfw_pair_shards(pairs_path, images_dir, out_dir, settings, shard_mb=100.0, num_workers=None,
                         prefix="pairs", overwrite=False, progress=True, max_pairs=None):
    """Pair shards from an LFW pairs file and its image folder (`max_pairs`: at most this
    many, evenly spread, for quick trials). Returns the manifest."""
    pair_list = _at_most(pairs_lib.read_lfw_pairs(pairs_path), max_pairs)
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"--input: no such image folder {images_dir!r}")
    names = sorted({p.path_a for p in pair_list} | {p.path_b for p in pair_list})
    input_config = {
        "source": os.fspath(pairs_path),
        "images": os.fspath(images_dir),
        "pairs_sha256": records.sha256_file(pairs_path),
        **_max_pairs_config(max_pairs),
    }
    config = _base_config("pairs", settings, input_config, shard_mb, prefix)
    images = {name: os.path.join(images_dir, name) for name in names}
    return _write_pairs(pair_list, images, out_dir, settings, config, shard_mb, num_workers, overwrite, progress)


def _at_most(pair_list, max_pairs):
    return [pair_list[i] for i in pairs_lib.spread_subset(len(pair_list), max_pairs)]


def _max_pairs_config(max_pairs):
    # Only when set: the manifests of full pair sets made before the flag stay as they were.
    return {} if max_pairs is None else {"max_pairs": max_pairs}


def make_bin_pair_shards(bin_path, out_dir, settings, shard_mb=100.0, num_workers=None,
                         prefix="pairs", overwrite=False, progress=True, num_folds=10, max_pairs=None):
    """Pair shards from an insightface `.bin` (aligned crops, folds as insightface's KFold)."""
    # insightface .bin files hold aligned 112x112 crops: no detection.
    settings = dataclasses.replace(settings, assume_aligned=True)
    encoded, is_same = pairs_lib.read_insightface_bin(bin_path)
    folds = pairs_lib.kfold_indices(len(is_same), num_folds)
    base = os.path.splitext(os.path.basename(bin_path))[0]
    images = {f"{base}/{i:06d}": data for i, data in enumerate(encoded)}
    pair_list = [
        pairs_lib.Pair(f"{base}/{2 * i:06d}", f"{base}/{2 * i:06d}", f"{base}/{2 * i + 1:06d}",
                       f"{base}/{2 * i + 1:06d}", bool(same), int(fold))
        for i, (same, fold) in enumerate(zip(is_same, folds))
    ]
    pair_list = _at_most(pair_list, max_pairs)
    input_config = {"source": os.fspath(bin_path), "bin_sha256": records.sha256_file(bin_path),
                    **_max_pairs_config(max_pairs)}
    config = _base_config("pairs", settings, input_config, shard_mb, prefix)
    return _write_pairs(pair_list, images, out_dir, settings, config, shard_mb, num_workers, overwrite, progress)
