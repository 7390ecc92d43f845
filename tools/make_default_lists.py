"""List files for the default model's training data (input to `tools/make_shards.py`).

Writes, into --out_dir:

- `train_list.txt`: `relative/path identity` lines below --data_root for every labelled
  training face: `celeba_subset` and `celeba_aligned_10k` (one identity per CelebA number,
  `celeba_7399`), `glint_sample` (`glint_Barack_Obama`) and the LFW people named in NO LFW
  pairs file (`lfw_NAME`; every name in `pairs.txt`, `pairsDevTrain.txt` and
  `pairsDevTest.txt` is left out, so that LFW figures stay honest).
- `holdout_list.txt`: the same for about --holdout_fraction of the identities with two or more
  images, chosen with --seed; they are not in `train_list.txt` and serve as validation people
  (checkpoint choice and the decision threshold, never LFW).
- `utkface_list.txt` (label -1): UTKFace has no identities. Its 112x112 crops are not aligned to
  the ArcFace template and the face fills them, so shard it with `make_shards --unlabelled
  --detect_padding=24` (detection on a black border instead of taking them as aligned crops).

    python -m tools.make_default_lists --data_root=../shared/data --out_dir=shards/default
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
from absl import flags  # noqa: E402

from xcos_tf import paths  # noqa: E402
from xcos_tf.data import pairs as pairs_lib  # noqa: E402


LFW_PAIRS_FILES = ("pairs.txt", "pairsDevTrain.txt", "pairsDevTest.txt")


def define_flags():
    """The command-line flags, defined only when this file runs as the program."""
    return types.SimpleNamespace(
        data_root=flags.DEFINE_string("data_root", paths.shared_path("data"),
                                      "The shared data folder (see its README.md)."),
        out_dir=flags.DEFINE_string("out_dir", None, "Where the list files are written."),
        holdout_fraction=flags.DEFINE_float(
            "holdout_fraction", 0.05, "Share of the identities with >= 2 images kept out as validation people."),
        seed=flags.DEFINE_integer("seed", 0, "Seed of the validation-people choice."),
    )


def celeba_items(data_root, folder):
    """[(relative path, 'celeba_ID')] from a CelebA folder's identity.txt (`ID/FILE ID` lines)."""
    items = []
    with open(os.path.join(data_root, folder, "identity.txt")) as f:
        for line in f:
            if line.strip():
                path, identity = line.split()
                items.append((f"{folder}/images/{path}", f"celeba_{identity}"))
    return items


def folder_items(data_root, folder, prefix, excluded=()):
    """[(relative path, PREFIX_NAME)] for every image of an ImageFolder tree, minus `excluded` names."""
    images = os.path.join(data_root, folder, "images")
    items = []
    for name in sorted(os.listdir(images)):
        if name in excluded:
            continue
        for file in sorted(os.listdir(os.path.join(images, name))):
            items.append((f"{folder}/images/{name}/{file}", f"{prefix}_{name}"))
    return items


def lfw_pairs_people(data_root):
    """Every LFW name that any LFW pairs file mentions."""
    people = set()
    for name in LFW_PAIRS_FILES:
        people.update(pairs_lib.people_in_pairs(pairs_lib.read_lfw_pairs(os.path.join(data_root, "lfw", name))))
    return people


def split_holdout(items, fraction, seed):
    """(train items, holdout items): a seeded `fraction` of the identities with >= 2 images."""
    counts = collections.Counter(identity for _, identity in items)
    candidates = sorted(identity for identity, count in counts.items() if count >= 2)
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(candidates, size=round(fraction * len(candidates)), replace=False).tolist())
    return ([item for item in items if item[1] not in chosen],
            [item for item in items if item[1] in chosen])


def utkface_items(data_root):
    folder = os.path.join("utkface_6k", "images")
    return [(os.path.join(folder, name), -1) for name in sorted(os.listdir(os.path.join(data_root, folder)))]


def _write_list(path, items):
    with open(path, "w") as f:
        f.writelines(f"{relative} {identity}\n" for relative, identity in items)


def main(argv, args):
    del argv
    data_root, out_dir = args.data_root.value, args.out_dir.value
    os.makedirs(out_dir, exist_ok=True)
    excluded = lfw_pairs_people(data_root)
    items = (celeba_items(data_root, "celeba_subset") + celeba_items(data_root, "celeba_aligned_10k")
             + folder_items(data_root, "glint_sample", "glint")
             + folder_items(data_root, "lfw", "lfw", excluded))
    train, holdout = split_holdout(items, args.holdout_fraction.value, args.seed.value)
    _write_list(os.path.join(out_dir, "train_list.txt"), train)
    _write_list(os.path.join(out_dir, "holdout_list.txt"), holdout)
    utkface = utkface_items(data_root)
    _write_list(os.path.join(out_dir, "utkface_list.txt"), utkface)
    for name, part in (("train", train), ("holdout", holdout)):
        print(f"{name}: {len(part)} images of {len({identity for _, identity in part})} identities")
    print(f"utkface: {len(utkface)} images (unlabelled); "
          f"{len(excluded)} LFW names in pairs files left out")


if __name__ == "__main__":
    _ARGS = define_flags()
    flags.mark_flags_as_required(["out_dir"])
    cli.run(lambda argv: main(argv, _ARGS))