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
import types

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xcos_tf import cli  # noqa: E402

cli.quiet_startup(__name__)  # before TensorFlow is imported

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from xcos_tf import metrics, scoring, model as xcos_model  # noqa: E402
from xcos_tf.data import pipeline  # noqa: E402

def define_flags():
    """The command-line flags, defined only when this file runs as the program."""
    return types.SimpleNamespace(
        weights=flags.DEFINE_string("weights", None, "A trainer saved as .keras."),
        pairs=flags.DEFINE_list("pairs", None, "Validation pair shards (folders or globs)."),
        far=flags.DEFINE_float("far", 1e-3, "Target false-accept rate.", lower_bound=0.0, upper_bound=1.0),
    )


def pair_scores(verifier, pair_patterns, batch_size=64):
    """(xCos scores, is_same) of every pair; each distinct face runs through the backbone once."""
    scorer, grids, scores, is_same = scoring.VerifierScorer(verifier), {}, [], []
    for batch in pipeline.eval_pair_dataset(pair_patterns, batch_size):
        sides = [
            scoring.grids_by_key(scorer, [s.decode() for s in batch[f"source_{side}"].numpy()],
                                 batch[f"image_{side}"].numpy(), grids, batch_size)
            for side in ("a", "b")
        ]
        scores.append(scoring.compare_grids(scorer, *sides, batch_size)["score"])
        is_same.append(batch["is_same"].numpy())
    return np.concatenate(scores), np.concatenate(is_same)


def main(argv, args):
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    verifier = xcos_model.build_verifier(args.weights.value)
    scores, is_same = pair_scores(verifier, args.pairs.value)
    chosen = metrics.tar_at_far(scores, is_same, args.far.value)
    num_different = int((~is_same).sum())
    warning = metrics.unresolved_far(args.far.value, num_different)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(json.dumps({"threshold": chosen.threshold, "far": chosen.far, "tar": chosen.tar, "target_far": args.far.value,
                      "smallest_resolved_far": 1 / num_different, "pairs": int(len(is_same)),
                      "same_pairs": int(is_same.sum()), "weights": args.weights.value}))


if __name__ == "__main__":
    _ARGS = define_flags()
    flags.mark_flags_as_required(["weights", "pairs"])
    cli.run(lambda argv: main(argv, _ARGS))
