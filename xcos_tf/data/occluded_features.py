"""Occlusion training on cached backbone maps (issue 14 item 5): pairs whose face B wears a
synthetic occluder, with the teacher's cosine of the occluded pair as the target.

A cached face map cannot be occluded after the fact (the backbone's receptive field spans the
face), so the occluded faces get their own feature caches. `OccludedFaces` is the `extra` of
`features.write_feature_shards`: for every training face it pastes one random occluder
(`occlusion.training_occlusion`, drawn from a seed and the face's record index, so a resumed
or re-made cache holds the same), runs the backbone and the teacher on the occluded face, and
adds to the face's record the occluded map, the teacher's embedding of the occluded face and
the share of each grid cell that the occluder covers. Such a cache is a face cache like any
other: its clean maps serve the centring and the clean pairs.

`OcclusionSampler` makes `features.feature_pair_dataset` replace face B of a share of the pairs
by its occluded version (never mirrored), whose target is then the teacher's cosine of face A
and the occluded face B, and adds `coverage_b` [H, W] (zeros when B is clean): where the
occluder lies, for the per-cell loss of `XCosTrainer(occlusion_weight)`.
"""
import os

import numpy as np
import tensorflow as tf

from xcos_tf import teacher as teacher_lib
from xcos_tf.data import features, records
from xcos_tf.occlusion import TRAINING_OCCLUDERS, cell_coverage, training_occlusion

OCCLUDED_KEYS = {
    "map": "occluded/map",
    "teacher_embedding": "occluded/teacher_embedding",
    "coverage": "occluded/coverage",
}
PREPROCESSING = ("color", "mean", "scale", "layout")  # the teacher settings a shard manifest records


def _float_feature(values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=np.asarray(values, np.float32).ravel().tolist()))


def shards_teacher(teacher_path, shard_files):
    """The `teacher.Teacher` at `teacher_path` with the preprocessing of the teacher that
    embedded the face shards `shard_files` (their manifests); ValueError unless it is that
    very model (same sha256), so that the clean and the occluded targets come from one teacher."""
    declared = []
    for folder in sorted({os.path.dirname(f) for f in shard_files}):
        teacher = (records.read_manifest(folder) or {}).get("teacher")
        if not teacher or "sha256" not in teacher:
            raise ValueError(f"{folder}: its manifest.json names no teacher with a sha256; re-make the shards")
        declared.append(teacher)
    if len({d["sha256"] for d in declared}) != 1:
        raise ValueError("the training shards were embedded by different teachers")
    if not os.path.isfile(teacher_path):
        raise ValueError(f"no such teacher file: {teacher_path!r}")
    if records.sha256_file(teacher_path) != declared[0]["sha256"]:
        raise ValueError(f"{teacher_path!r} is not the teacher that embedded the training shards "
                         f"({declared[0].get('name', '?')}, sha256 {declared[0]['sha256'][:12]}...)")
    return teacher_lib.Teacher(teacher_path, **{key: declared[0][key] for key in PREPROCESSING})


class OccludedFaces:
    """The occluded-face fields of a face feature cache (`features.write_feature_shards(extra=)`).

    Args:
        teacher: `teacher.Teacher`, the model whose embeddings the shards hold.
        seed: int, with each face's record index draws its occluder.
    """

    def __init__(self, teacher, seed=0):
        self.teacher = teacher
        self.seed = int(seed)
        self.config = {"occluders": list(TRAINING_OCCLUDERS), "occlusion_seed": self.seed,
                       "occlusion_teacher": dict(teacher.get_config(), sha256=records.sha256_file(teacher.path))}

    def occlude(self, faces, start):
        """(occluded faces uint8 [N, H, W, 3], occluder masks bool [N, H, W]) of the records
        `start`, `start + 1`, ...: the same faces and indices always get the same occluders."""
        pasted = [training_occlusion(face, np.random.default_rng([self.seed, start + i])) for i, face in enumerate(faces)]
        occluded, masks = zip(*pasted)
        return np.stack(occluded), np.stack(masks)

    def features(self, batch, start, maps_of):
        faces = np.clip(np.round(batch["image"]), 0, 255).astype(np.uint8)
        occluded, masks = self.occlude(faces, start)
        maps = np.asarray(maps_of(occluded.astype(np.float32)))
        embeddings = self.teacher.embed(occluded)
        cells = maps.shape[1:3]
        return [{OCCLUDED_KEYS["map"]: features.map_feature(feature_map),
                 OCCLUDED_KEYS["teacher_embedding"]: _float_feature(embedding),
                 OCCLUDED_KEYS["coverage"]: _float_feature(cell_coverage(mask, cells))}
                for feature_map, embedding, mask in zip(maps, embeddings, masks)]


class OcclusionSampler:
    """Face B of a share of the training pairs occluded (`features.feature_pair_dataset(occlusion=)`).

    Args:
        cache_dirs: the face feature caches the pairs come from; each must hold `OccludedFaces`.
        fraction: float in (0, 1], the share of pairs whose face B is its occluded version.
    """

    def __init__(self, cache_dirs, fraction):
        if not 0 < fraction <= 1:
            raise ValueError(f"`fraction` must be in (0, 1]. Received: fraction={fraction}")
        for cache in [cache_dirs] if isinstance(cache_dirs, (str, os.PathLike)) else cache_dirs:
            if "occluders" not in features.check_cache(cache, kind="faces").get("extra", {}):
                raise ValueError(f"{cache} holds no occluded faces (write it with extra=OccludedFaces(...))")
        self.fraction = float(fraction)
        self._spec = {
            OCCLUDED_KEYS["map"]: tf.io.FixedLenFeature([], tf.string),
            OCCLUDED_KEYS["teacher_embedding"]: tf.io.FixedLenSequenceFeature([], tf.float32, allow_missing=True),
            OCCLUDED_KEYS["coverage"]: tf.io.FixedLenSequenceFeature([], tf.float32, allow_missing=True),
        }

    def parse(self, serialized):
        parsed = tf.io.parse_single_example(serialized, self._spec)
        return {f"occluded_{key}": parsed[name] for key, name in OCCLUDED_KEYS.items()}

    def occlude_b(self, pair, seed, feature_map, embedding, shape):
        """Face B's (map, teacher embedding, {"coverage_b"}): its occluded version's with
        probability `fraction` (a stateless draw from `seed`), else the ones given."""
        occluded = tf.random.stateless_uniform([], seed) < self.fraction
        feature_map = tf.where(occluded, features.parse_map(pair["occluded_map"][1], shape), feature_map)
        embedding = tf.where(occluded, pair["occluded_teacher_embedding"][1], embedding)
        coverage = tf.reshape(pair["occluded_coverage"][1], shape[:2])
        return feature_map, embedding, {"coverage_b": tf.where(occluded, coverage, tf.zeros_like(coverage))}
