"""The decision threshold of a model at a false-accept rate, chosen on validation pairs.

The shipped model's threshold is chosen on pairs of held-out training people
(`tools/make_holdout_pairs.py`), never on the test set, and then given to
`python -m xcos_tf.export --threshold=T --far=F`:

    python -m tools.choose_threshold --weights=runs/default/best.keras \
        --pairs=shards/default/holdout_pairs --far=1e-3

Prints one JSON line: threshold, the false-accept and true-accept rates at it, the smallest
false-accept rate the pairs resolve (1 / different-person pairs), the pairs used; and a warning
line on stderr when --far is below that rate.
"""
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from xcos_tf import metrics, model as xcos_model  # noqa: E402
from xcos_tf.data import pipeline  # noqa: E402

_WEIGHTS = flags.DEFINE_string("weights", None, "A trainer saved as .keras.")
_PAIRS = flags.DEFINE_list("pairs", None, "Validation pair shards (folders or globs).")
_FAR = flags.DEFINE_float("far", 1e-3, "Target false-accept rate.", lower_bound=0.0, upper_bound=1.0)


def pair_scores(verifier, pair_patterns, batch_size=64):
    """(xCos scores, is_same) of every pair; each distinct face runs through the backbone once."""
    grids, scores, is_same = {}, [], []
    for batch in pipeline.eval_pair_dataset(pair_patterns, batch_size):
        sides = []
        for side in ("a", "b"):
            keys = [s.decode() for s in batch[f"source_{side}"].numpy()]
            missing = [i for i, key in enumerate(keys) if key not in grids]
            if missing:
                images = batch[f"image_{side}"].numpy()[missing]
                computed = np.asarray(verifier.embed({"image": images}, training=False)["grid"])
                grids.update({keys[i]: grid for i, grid in zip(missing, computed)})
            sides.append(np.stack([grids[key] for key in keys]))
        outputs = verifier.compare({"grid_a": sides[0], "grid_b": sides[1]}, training=False)
        scores.append(np.asarray(outputs["score"]))
        is_same.append(batch["is_same"].numpy())
    return np.concatenate(scores), np.concatenate(is_same)


def main(argv):
    del argv
    verifier = xcos_model.build_verifier(_WEIGHTS.value)
    scores, is_same = pair_scores(verifier, _PAIRS.value)
    chosen = metrics.tar_at_far(scores, is_same, _FAR.value)
    num_different = int((~is_same).sum())
    warning = metrics.unresolved_far(_FAR.value, num_different)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(json.dumps({"threshold": chosen.threshold, "far": chosen.far, "tar": chosen.tar, "target_far": _FAR.value,
                      "smallest_resolved_far": 1 / num_different, "pairs": int(len(is_same)),
                      "same_pairs": int(is_same.sum()), "weights": _WEIGHTS.value}))


if __name__ == "__main__":
    flags.mark_flags_as_required(["weights", "pairs"])
    app.run(main)
