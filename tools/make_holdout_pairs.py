r"""Validation pair shards from face shards of held-out people (no LFW involved).

The default model chooses its checkpoint and its decision threshold (at a false-accept rate)
on pairs of training-set people who were kept out of training (`tools/make_default_lists.py`
writes their list; `tools/make_shards.py` aligns them into face shards). This tool draws
--num_pairs pairs from those faces, --same_fraction of them same-person pairs, with a fixed
seed, and writes them in the evaluation pair-shard format (`pipeline.eval_pair_dataset`,
`python -m xcos_tf.evaluate`), reusing the faces' aligned crops and teacher embeddings.
Folds follow people: every pair is in the fold of its first person.

    python -m tools.make_holdout_pairs --faces=shards/default/holdout_faces \
        --out_dir=shards/default/holdout_pairs --num_pairs=3000
"""
import collections
import os
import sys
import types

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xcos_tf import cli  # noqa: E402

cli.quiet_startup(__name__)  # before TensorFlow is imported

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

from xcos_tf.data import pipeline, records  # noqa: E402

def define_flags():
    """The command-line flags, defined only when this file runs as the program."""
    return types.SimpleNamespace(
        faces=flags.DEFINE_list("faces", None, "Face shards (folders or globs) of the held-out people."),
        out_dir=flags.DEFINE_string("out_dir", None, "Output folder for the pair shards and manifest.json."),
        num_pairs=flags.DEFINE_integer("num_pairs", 3000, "Pairs to draw.", lower_bound=10),
        same_fraction=flags.DEFINE_float("same_fraction", 0.5, "Share of same-person pairs.", lower_bound=0.0,
                                         upper_bound=1.0),
        num_folds=flags.DEFINE_integer("num_folds", 10, "Folds (by person).", lower_bound=2),
        seed=flags.DEFINE_integer("seed", 0, "Seed of the pair draw."),
    )


def read_faces(shard_patterns):
    """Every face record of the shards, decoded to numpy/bytes, in file order."""
    faces = []
    for path in pipeline.list_shards(shard_patterns):
        for serialized in tf.data.TFRecordDataset(path):
            face = records.decode_face(serialized)
            faces.append({key: value.numpy() for key, value in face.items()})
    return faces


def draw_pairs(labels, num_pairs, same_fraction, seed):
    """[(index a, index b, is_same)]: distinct pairs of distinct faces, same ones within a label."""
    rng = np.random.default_rng(seed)
    by_label = collections.defaultdict(list)
    for index, label in enumerate(labels):
        if label >= 0:
            by_label[label].append(index)
    same_pool = [(a, b) for members in by_label.values() for i, a in enumerate(members) for b in members[i + 1:]]
    num_same = round(num_pairs * same_fraction)
    if len(same_pool) < num_same:
        raise ValueError(f"Only {len(same_pool)} same-person pairs exist; asked for {num_same}")
    chosen = [same_pool[i] + (True,) for i in rng.choice(len(same_pool), num_same, replace=False)]
    labelled = [i for members in by_label.values() for i in members]
    seen = set()
    while len(chosen) < num_pairs:
        a, b = rng.choice(labelled, 2, replace=False)
        if labels[a] != labels[b] and (min(a, b), max(a, b)) not in seen:
            seen.add((min(a, b), max(a, b)))
            chosen.append((int(a), int(b), False))
    return chosen


def main(argv, args):
    del argv
    faces = read_faces(args.faces.value)
    labels = np.array([face["label"] for face in faces])
    pairs = draw_pairs(labels, args.num_pairs.value, args.same_fraction.value, args.seed.value)
    people = sorted(set(labels[labels >= 0].tolist()))
    fold_of = {label: i % args.num_folds.value for i, label in enumerate(np.random.default_rng(args.seed.value).permutation(people))}
    serialized = []
    for a, b, is_same in sorted(pairs, key=lambda pair: (fold_of[labels[pair[0]]], not pair[2])):
        face_a, face_b = faces[a], faces[b]
        serialized.append(records.encode_pair_example(
            face_a["image_encoded"], face_b["image_encoded"], face_a["image_format"].decode(), is_same,
            fold_of[labels[a]], face_a["identity"], face_b["identity"], face_a["source"], face_b["source"],
            face_a["teacher_embedding"], face_b["teacher_embedding"]))
    os.makedirs(args.out_dir.value, exist_ok=True)
    entry = records.write_shard(os.path.join(args.out_dir.value, records.shard_name("pairs", 0)), serialized)
    source = records.read_manifest(os.path.dirname(pipeline.list_shards(args.faces.value)[0])) or {}
    records.write_json_atomic(os.path.join(args.out_dir.value, records.MANIFEST_NAME), {
        "kind": "pairs",
        "input": {"source": [os.path.abspath(p) for p in args.faces.value], "seed": args.seed.value},
        "teacher": source.get("teacher"),
        "alignment": source.get("alignment"),
        "num_pairs": len(serialized),
        "num_same": sum(same for _, _, same in pairs),
        "num_folds": args.num_folds.value,
        "num_records": len(serialized),
        "shards": [entry],
        "complete": True,
    })
    print(f"{len(serialized)} pairs ({sum(same for _, _, same in pairs)} same) of {len(people)} people in {args.out_dir.value}")


if __name__ == "__main__":
    _ARGS = define_flags()
    flags.mark_flags_as_required(["faces", "out_dir"])
    cli.run(lambda argv: main(argv, _ARGS))