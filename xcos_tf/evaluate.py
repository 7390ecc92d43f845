"""Evaluate a verifier: the LFW protocol, robustness to occluders, and how faithful the maps are.

`python -m xcos_tf.evaluate --model DIR --pairs PAIR_SHARDS_OR_LFW_DIR [--teacher PATH]
[--out_dir DIR] [--max_pairs N] [--methods=xcos,decomposition,gradcam] [--max_megapixels 50]`

- Verification: k-fold accuracy over the pairs' own folds (10 for LFW; the threshold chosen on
  the other folds), TAR at FAR 1e-2
  and 1e-3, ROC curve; rows for the xCos score, the plain cosine of the 1568-d embedding, and
  the teacher's cosine (from `--teacher`, or from the teacher embeddings stored in the shards),
  and, when the export has the `decompose` signature, "decompose (teacher)": the original
  teacher's cosine from it, with the largest |sum(contribution_map) + bias - score| and its gap
  to the teacher row (stored cosines were computed before make_shards' JPEG encoding: said).
- Occlusion: the same pairs with a synthetic occluder pasted on face B (`OCCLUDERS`: dark
  glasses over the eyes, a mask over nose and mouth, a random square, a black band over both
  eyes, placed from the ArcFace template): k-fold accuracy of each row, and how often the
  lowest-cos cell lies under the occluder (at least half covered), next to the chance rate.
- Faithfulness of each explanation method's maps (`--methods`; the model must be able to run
  it, else it is named and skipped): deletion and insertion AUC against a random order, occluder
  localisation and the pointing game (`xcos_tf.faithfulness` says what each measures).
- Correlation: Pearson's r between the xCos score and the teacher cosine over all pairs.

Writes `results.json` (every number), `roc.png`, `deletion.png` (deletion and insertion curves)
and `occluders.png` into `--out_dir` and prints one table.
"""
import dataclasses
import glob
import json
import os
import sys
import types

import numpy as np
from absl import flags

from xcos_tf import cli, faithfulness, metrics, progress, runtime
from xcos_tf.occlusion import GREY, OCCLUDERS, SQUARE_SIZE, cell_coverage, occlude, occluder_box
from xcos_tf.scoring import compare_grids, decompose_pairs, embed_faces, row_cosine
from xcos_tf.data import align, image_io
from xcos_tf.data import pairs as pairs_lib
from xcos_tf.data.pairs import spread_subset
from xcos_tf.explain import METHODS, exit_with_error, method_available

FARS = (1e-2, 1e-3)
PROTOCOL_FOLDS = 10  # LFW's


def fewer_folds_warning(folds):
    return (f"warning: the pairs have {folds} folds, fewer than the {PROTOCOL_FOLDS} of the LFW protocol: "
            "each threshold is chosen on fewer pairs and the accuracy is not comparable with 10-fold figures")


@dataclasses.dataclass
class PairSet:
    """Evaluation pairs over a set of aligned faces.

    Attributes:
        faces: uint8 [M, 112, 112, 3], each face once (LFW images recur across pairs).
        index_a, index_b: int [P], the faces of each pair.
        is_same: bool [P].
        folds: int [P], the protocol fold of each pair.
        teacher_cos: float32 [P] or None, the teacher cosine stored with the pairs.
        source: str, where the pairs came from.
        teacher_cos_note: str, what the stored teacher cosine saw that the models here do not
            ("" when the same faces).
    """

    faces: np.ndarray
    index_a: np.ndarray
    index_b: np.ndarray
    is_same: np.ndarray
    folds: np.ndarray
    teacher_cos: np.ndarray = None
    source: str = ""
    teacher_cos_note: str = ""

    def __len__(self):
        return len(self.is_same)


def load_lfw(lfw_dir, aligner, max_pairs=None, max_pixels=image_io.MAX_PIXELS):
    """LFW `pairs.txt` + `images/` -> `PairSet`, faces aligned by `aligner` (central face).

    A photo of more than `max_pixels` pixels is an `ImageError` naming it. A photo where the detector finds no face is used whole, resized to 112x112 (the
    deep-funneled LFW crops are centred on the face), so that no pair of the protocol is
    dropped; the count is in `source`.
    """
    lfw_dir = os.fspath(lfw_dir)
    all_pairs = pairs_lib.read_lfw_pairs(os.path.join(lfw_dir, "pairs.txt"))
    chosen = [all_pairs[i] for i in spread_subset(len(all_pairs), max_pairs)]
    paths = sorted({p.path_a for p in chosen} | {p.path_b for p in chosen})
    position = {path: i for i, path in enumerate(paths)}
    faces, undetected = [], 0
    _log(f"aligning {len(paths)} LFW images for {len(chosen)} pairs")
    for path in progress.bar(paths, description="aligning", unit="image"):
        image = align.read_image(os.path.join(lfw_dir, "images", path), max_pixels)
        try:
            faces.append(aligner.align(image, assume_aligned=False).image)
        except align.FaceError:
            undetected += 1
            faces.append(aligner.align(image, assume_aligned=True).image)
    return PairSet(
        faces=np.stack(faces),
        index_a=np.array([position[p.path_a] for p in chosen]),
        index_b=np.array([position[p.path_b] for p in chosen]),
        is_same=np.array([p.is_same for p in chosen]),
        folds=np.array([p.fold for p in chosen]),
        source=f"{lfw_dir} (pairs.txt; YuNet alignment; {undetected} of {len(paths)} images "
               "without a detected face used whole)",
    )


def load_pair_shards(path, max_pairs=None):
    """Pair shards (`tools/make_shards`) -> `PairSet`; each pair keeps its own two faces."""
    import tensorflow as tf  # only for shards

    from xcos_tf.data import pipeline, records

    batches = []
    for batch in pipeline.eval_pair_dataset(path, batch_size=256).as_numpy_iterator():
        for key in ("image_a", "image_b"):  # uint8 right away: a quarter of float32's memory
            batch[key] = np.round(batch[key]).astype(np.uint8)
        batches.append(batch)
    columns = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    # Every face of a make_shards run has one encoding: the first record's says which.
    first = records.decode_pair(next(iter(tf.data.TFRecordDataset(pipeline.list_shards(path)[0]))))
    chosen = spread_subset(len(columns["is_same"]), max_pairs)
    faces_a, faces_b = columns["image_a"][chosen], columns["image_b"][chosen]
    count = len(chosen)
    teacher_cos = columns["teacher_cos"][chosen] if "teacher_cos" in columns else None
    return PairSet(
        faces=np.concatenate([faces_a, faces_b]),
        index_a=np.arange(count),
        index_b=np.arange(count, 2 * count),
        is_same=columns["is_same"][chosen].astype(bool),
        folds=columns["fold"][chosen],
        teacher_cos=teacher_cos,
        source=f"{path} (pair shards)",
        teacher_cos_note=_stored_teacher_note(first["image_format"].numpy().decode()),
    )


def _stored_teacher_note(image_format):
    """make_shards embeds each aligned face with the teacher before it encodes it: with a lossy
    encoding the stored teacher cosine saw other pixels than any model that reads the shards."""
    if image_format != "jpeg":
        return ""
    return ("the stored teacher cosines are the teacher's on the aligned faces before make_shards stored them "
            "as JPEG; decompose and --teacher run it on the decoded JPEG faces")


def load_pairs(path, detector, max_pairs=None, max_pixels=image_io.MAX_PIXELS):
    """An LFW folder (with `pairs.txt`) or pair shards (a folder, file or glob) -> `PairSet`;
    `max_pixels` limits the LFW photos (the shards hold aligned faces)."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "pairs.txt")):
        return load_lfw(path, align.FaceAligner(detector, choose="central"), max_pairs, max_pixels)
    if not glob.glob(path):  # before TensorFlow is imported for the shards
        raise FileNotFoundError(f"no such folder, file or glob match: {path!r}")
    return load_pair_shards(path, max_pairs)


# === Measures ===
def verification_summary(scores, is_same, folds):
    """k-fold accuracy (the pairs' own folds), TAR at each of `FARS` and ROC points of one score."""
    accuracy = metrics.k_fold_accuracy(scores, is_same, folds=folds)
    roc = metrics.roc_curve(scores, is_same)
    return {
        "accuracy": accuracy.mean,
        "accuracy_std": accuracy.std,
        "fold_accuracies": accuracy.fold_accuracies.tolist(),
        "tar_at_far": {f"{far:g}": metrics.tar_at_far(scores, is_same, far)._asdict() for far in FARS},
        "roc": {"far": roc.far.tolist(), "tar": roc.tar.tolist()},
    }


def pearson(x, y):
    """Pearson's correlation coefficient of two 1-D arrays."""
    return float(np.corrcoef(np.asarray(x, np.float64), np.asarray(y, np.float64))[0, 1])


def _log(message):
    print(message, file=sys.stderr, flush=True)


def evaluate_pairs(model, pairs, teacher=None, occluders=OCCLUDERS, deletion_pairs=100, seed=0, methods=("xcos",),
                   decompose=False):
    """Every measure of this module on one `PairSet`; returns a JSON-ready dict.

    Args:
        model: a runtime (`xcos_tf.runtime.load`) or anything with its `embed` and `compare`.
        pairs: `PairSet`.
        teacher: optional `xcos_tf.teacher.Teacher`; without it, the teacher row uses
            `pairs.teacher_cos` when the pairs carry it (no teacher row under occlusion then).
        occluders: names from `OCCLUDERS`.
        deletion_pairs: int, same-person pairs (evenly spread) for the deletion and insertion
            curves; 0 skips them.
        seed: int, seeds the random squares and the random cell orders.
        methods: explanation methods for the faithfulness table (`faithfulness.EXPLAINED_SCORES`),
            all of which `model` must be able to run.
        decompose: bool, also verify with the model's `decompose` signature (the original
            teacher's cosine split per cell): its own row, and how exactly its cells sum to it.
    """
    rng = np.random.default_rng(seed)
    index_a, index_b, is_same = pairs.index_a, pairs.index_b, pairs.is_same
    _log(f"embedding {len(pairs.faces)} faces of {len(pairs)} pairs")
    embedding, grid = embed_faces(model, pairs.faces)
    clean = compare_grids(model, grid[index_a], grid[index_b])
    cells = clean["cos_map"].shape[1:]
    scores = {"xcos": clean["score"], "cosine": row_cosine(embedding[index_a], embedding[index_b])}
    if teacher is not None:
        teacher_embedding = teacher.embed(pairs.faces)
        scores["teacher"] = row_cosine(teacher_embedding[index_a], teacher_embedding[index_b])
    elif pairs.teacher_cos is not None:
        scores["teacher"] = np.asarray(pairs.teacher_cos, np.float32)
    if decompose:
        _log(f"decompose: the teacher's cosine of {len(pairs)} pairs, split per cell")
        parts = decompose_pairs(model, pairs.faces[index_a], pairs.faces[index_b])
        scores["decompose"] = parts["score"]
        residual = parts["contribution_map"].sum(axis=(1, 2)) + parts["bias"] - parts["score"]
        decompose_check = {"max_abs_sum_plus_bias_minus_score": float(np.max(np.abs(residual)))}
        if "teacher" in scores:
            difference = np.abs(parts["score"] - scores["teacher"])
            decompose_check.update(max_abs_minus_teacher=float(difference.max()),
                                   mean_abs_minus_teacher=float(difference.mean()))
            if teacher is None and pairs.teacher_cos_note:
                decompose_check["teacher_note"] = pairs.teacher_cos_note
    results = {
        "source": pairs.source,
        "settings": {
            "seed": seed,
            "occluders_on": "face B",
            "occluder_boxes_xyxy": {k: (occluder_box(k) if k != "square" else f"random {SQUARE_SIZE} px square")
                                    for k in occluders},
            "deletion_grey": GREY,
            "localisation_pairs": "same-person",
        },
        "pairs": len(pairs),
        "same_pairs": int(is_same.sum()),
        "folds": int(len(np.unique(pairs.folds))),
        "verification": {name: verification_summary(s, is_same, pairs.folds) for name, s in scores.items()},
    }
    if decompose:
        results["decompose_check"] = decompose_check

    same = np.flatnonzero(is_same)
    results["occlusion"], occluded_same = {}, {}
    for kind in occluders:
        _log(f"occluder {kind!r} on face B of every pair")
        occluded, masks = zip(*(occlude(pairs.faces[j], kind, rng) for j in index_b))
        occluded = np.stack(occluded)
        occluded_embedding, occluded_grid = embed_faces(model, occluded)
        outputs = compare_grids(model, grid[index_a], occluded_grid)
        occluded_scores = {"xcos": outputs["score"], "cosine": row_cosine(embedding[index_a], occluded_embedding)}
        if teacher is not None:
            occluded_scores["teacher"] = row_cosine(teacher_embedding[index_a], teacher.embed(occluded))
        coverage = np.stack([cell_coverage(mask, cells) for mask in masks])
        occluded_same[kind] = (occluded[same], coverage[same])
        lowest_cos = faithfulness.localisation(outputs["cos_map"][same], coverage[same])
        results["occlusion"][kind] = {
            "accuracy": {name: metrics.k_fold_accuracy(score, is_same, folds=pairs.folds).mean
                         for name, score in occluded_scores.items()},
            "localisation": lowest_cos["localisation"],
            "localisation_chance": lowest_cos["localisation_chance"],
        }

    if len(same) and methods:
        curve_pairs = spread_subset(len(same), deletion_pairs) if deletion_pairs else np.arange(0)
        _log(f"faithfulness of {', '.join(methods)}: deletion and insertion curves on {len(curve_pairs)} same-person "
             f"pairs ({cells[0] * cells[1] + 1} steps, 2 orders), localisation on {len(same)}")
        with progress.bar(total=len(curve_pairs) * len(methods), description="curves", unit="pair") as bar:
            results["faithfulness"] = faithfulness.faithfulness_table(
                model, list(methods), pairs.faces[index_a[same]], pairs.faces[index_b[same]], occluded_same,
                curve_pairs, rng, progress=bar)
    if "teacher" in scores:
        results["correlation"] = {"pearson_xcos_teacher": pearson(scores["xcos"], scores["teacher"]),
                                  "pearson_cosine_teacher": pearson(scores["cosine"], scores["teacher"])}
    return results


ROW_NAMES = {"xcos": "xCos score", "cosine": "plain cosine (embedding)", "teacher": "teacher cosine",
             "decompose": "decompose (teacher)"}


def format_table(results):
    """The printed summary: one table, verification rows, occlusion rows, faithfulness."""
    names = list(results["verification"])
    far_keys = [f"{far:g}" for far in FARS]
    lines = [
        f"{results['pairs']} pairs ({results['same_pairs']} same-person), {results['folds']} folds: "
        f"{results['source']}",
        "",
        f"{'':34}" + "".join(f"{ROW_NAMES[n]:>27}" for n in names),
    ]
    verification = results["verification"]
    lines.append(f"{str(results['folds']) + '-fold accuracy':34}" + "".join(
        f"{100 * verification[n]['accuracy']:>19.2f} ± {100 * verification[n]['accuracy_std']:4.2f} %" for n in names))
    different = results["pairs"] - results["same_pairs"]
    for far, key in zip(FARS, far_keys):
        # How coarse the estimate is: the false accepts this many different-person pairs allow.
        label = f"TAR @ FAR={key} ({int(far * different + 1e-9)} of {different} FA)"
        lines.append(f"{label:34}" + "".join(
            f"{100 * verification[n]['tar_at_far'][key]['tar']:>25.2f} %" for n in names))
    # One line per FAR target that these pairs cannot resolve (its TAR row is then not at that FAR).
    lines.extend(f"  {note}" for note in (metrics.unresolved_far(far, different) for far in FARS) if note)
    for kind, row in results["occlusion"].items():
        lines.append(f"{'occluded (' + kind + ') accuracy':34}" + "".join(
            f"{100 * row['accuracy'][n]:>25.2f} %" if n in row["accuracy"] else f"{'-':>27}" for n in names))
    if results["folds"] < PROTOCOL_FOLDS:
        lines.append(f"  {fewer_folds_warning(results['folds'])}")
    lines.append("")
    for kind, row in results["occlusion"].items():
        lines.append(f"  lowest-cos cell under the {kind:<10}: {100 * row['localisation']:6.2f} % of same-person pairs"
                     f" (chance {100 * row['localisation_chance']:.2f} %)")
    if "correlation" in results:
        correlation = results["correlation"]
        lines.append(f"  Pearson r with the teacher cosine: xCos score {correlation['pearson_xcos_teacher']:.4f}, "
                     f"plain cosine {correlation['pearson_cosine_teacher']:.4f}")
    lines.extend(_decompose_lines(results))
    if "faithfulness" in results or results.get("faithfulness_skipped"):
        lines.append("")
        lines.append("faithfulness of the maps (same-person pairs; occluders on face B)")
        lines.extend(faithfulness.format_faithfulness(results.get("faithfulness", {}),
                                                      results.get("faithfulness_skipped")))
    return "\n".join(lines)


def _decompose_lines(results):
    """How exactly decompose's cells sum to its score, and how its score compares with the
    teacher row's (the same model: any gap comes from the pixels each saw)."""
    check = results.get("decompose_check")
    if not check:
        return []
    lines = [f"  decompose: |sum(contribution_map) + bias - score| <= {check['max_abs_sum_plus_bias_minus_score']:.1e} "
             f"over all {results['pairs']} pairs"]
    if "max_abs_minus_teacher" in check:
        verification = results["verification"]
        gap = 100 * (verification["decompose"]["accuracy"] - verification["teacher"]["accuracy"])
        lines.append(f"  decompose vs teacher cosine: |difference| mean {check['mean_abs_minus_teacher']:.1e}, max "
                     f"{check['max_abs_minus_teacher']:.1e}; accuracy {gap:+.2f} points")
        if "teacher_note" in check:
            lines.append(f"    ({check['teacher_note']})")
    return lines


def _new_figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_plots(results, pairs, out_dir, seed=0):
    """roc.png, deletion.png (when measured) and occluders.png into `out_dir`; returns the paths."""
    written = []
    figure = _new_figure((6.5, 5))
    ax = figure.subplots()
    for name, row in results["verification"].items():
        far, tar = np.array(row["roc"]["far"]), np.array(row["roc"]["tar"])
        keep = far > 0
        ax.step(far[keep], tar[keep], where="post", label=f"{ROW_NAMES[name]} ({100 * row['accuracy']:.2f} %)")
    ax.set_xscale("log")
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(f"ROC, {results['pairs']} pairs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    written.append(os.path.join(out_dir, "roc.png"))
    figure.savefig(written[-1])

    table = results.get("faithfulness", {})
    curved = [method for method, row in table.items() if "deletion" in row]
    if curved:
        figure = _new_figure((11, 4.5))
        for ax, kind in zip(figure.subplots(1, 2), ("deletion", "insertion")):
            for method in curved:
                row = table[method][kind]
                x = np.linspace(0, 1, len(row["contribution_curve"]))
                line, = ax.plot(x, row["contribution_curve"], label=f"{method} ({row['contribution_auc']:.3f})")
                ax.plot(x, row["random_curve"], linestyle=":", color=line.get_color(),
                        label=f"{method}, random order ({row['random_auc']:.3f})")
            ax.set_xlabel(f"share of face B's cells {'greyed out' if kind == 'deletion' else 'restored'}")
            ax.set_ylabel("mean score the method explains")
            ax.set_title(f"{kind.capitalize()} curves (AUC), {table[curved[0]]['curve_pairs']} same-person pairs")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        written.append(os.path.join(out_dir, "deletion.png"))
        figure.savefig(written[-1])

    kinds = list(results["occlusion"])
    if kinds:
        face = pairs.faces[pairs.index_b[0]]
        figure = _new_figure((2.2 * (len(kinds) + 1), 2.6))
        axes = np.atleast_1d(figure.subplots(1, len(kinds) + 1))
        rng = np.random.default_rng(seed)
        for ax, (label, image) in zip(axes, [("face B", face)] + [(k, occlude(face, k, rng)[0]) for k in kinds]):
            ax.imshow(image)
            ax.set_title(label, fontsize=9)
            ax.set_axis_off()
        written.append(os.path.join(out_dir, "occluders.png"))
        figure.savefig(written[-1])
    return written


def runnable_methods(model, methods, face):
    """(the `methods` that `model` can run, {method: why not}). A runtime may have a `decompose`
    method while its export or format lacks the signature: decomposition is tried on one face."""
    runnable, skipped = [], {}
    for method in methods:
        if not method_available(model, method):
            skipped[method] = "the model has no decompose signature (export it with a teacher)"
            continue
        if method == "decomposition":
            try:
                model.decompose(face[None], face[None])
            except ValueError as err:  # runtime.SignatureUnavailableError, a broken output
                skipped[method] = str(err)
                continue
        runnable.append(method)
    return runnable, skipped


def define_flags():
    """The command-line flags, defined only when this module runs as the script (absl refuses
    a flag defined twice, and other modules define `--model` too)."""
    return types.SimpleNamespace(
        model=cli.define_model(),
        format=cli.define_format(),
        pairs=flags.DEFINE_string(
            "pairs", None, "Pair shards (folder, file or glob) or an LFW folder with pairs.txt and images/."),
        teacher=flags.DEFINE_string("teacher", None, "Teacher model (.onnx, .tflite, SavedModel) for the teacher row."),
        out_dir=flags.DEFINE_string("out_dir", "evaluation", "Folder for results.json and the PNG curves."),
        max_pairs=flags.DEFINE_integer(
            "max_pairs", None, "Evaluate at most this many pairs, evenly spread over the folds.", lower_bound=20),
        occluders=flags.DEFINE_list(
            "occluders", list(OCCLUDERS), f"Occluders to measure, from {', '.join(OCCLUDERS)} (empty: none)."),
        deletion_pairs=flags.DEFINE_integer(
            "deletion_pairs", 100, "Same-person pairs for the deletion and insertion curves (0: skip).", lower_bound=0),
        seed=flags.DEFINE_integer("seed", 0, "Seed of the random squares and the random cell orders."),
        methods=flags.DEFINE_list(
            "methods", ["xcos"], f"Explanation methods for the faithfulness table, from {', '.join(METHODS)}; "
            "methods the model cannot run are named and skipped (empty: no table)."),
        detector=cli.define_detector("YuNet face detector ONNX file (LFW folders)."),
        max_megapixels=cli.define_max_megapixels(),
    )


def main(argv, args):
    if len(argv) > 1:
        exit_with_error(f"unexpected arguments {argv[1:]}; give the pairs with --pairs")
    unknown = sorted(set(args.occluders.value) - set(OCCLUDERS))
    if unknown:
        exit_with_error(f"--occluders: unknown {unknown}; valid: {', '.join(OCCLUDERS)}")
    unknown = sorted(set(args.methods.value) - set(METHODS))
    if unknown:
        exit_with_error(f"--methods: unknown {unknown}; valid: {', '.join(METHODS)}")
    max_pixels = cli.max_pixels(args.max_megapixels.value)
    teacher = None
    if args.teacher.value:
        from xcos_tf.teacher import Teacher

        try:
            teacher = Teacher(args.teacher.value)
        except (OSError, ValueError) as err:
            exit_with_error(f"--teacher {args.teacher.value}: {err}")
    try:
        pairs = load_pairs(args.pairs.value, args.detector.value, args.max_pairs.value, max_pixels)
    except (OSError, ValueError) as err:
        exit_with_error(f"--pairs {args.pairs.value}: {err}")
    try:
        model = runtime.load(args.model.value, format=args.format.value)
    except (OSError, ValueError) as err:
        exit_with_error(f"--model {args.model.value}: {err}")
    methods, skipped = runnable_methods(model, args.methods.value, pairs.faces[0])
    decompose = not runnable_methods(model, ["decomposition"], pairs.faces[0])[1]
    folds = len(np.unique(pairs.folds))
    if folds < PROTOCOL_FOLDS:
        _log(fewer_folds_warning(folds))
    results = evaluate_pairs(model, pairs, teacher=teacher, occluders=tuple(args.occluders.value),
                             deletion_pairs=args.deletion_pairs.value, seed=args.seed.value, methods=methods,
                             decompose=decompose)
    if skipped:
        results["faithfulness_skipped"] = skipped
    results["model"] = {"path": args.model.value, "format": args.format.value}
    if args.teacher.value:
        results["teacher_path"] = args.teacher.value
    os.makedirs(args.out_dir.value, exist_ok=True)
    written = save_plots(results, pairs, args.out_dir.value, seed=args.seed.value)
    results_path = os.path.join(args.out_dir.value, "results.json")
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1)
    print(format_table(results))
    print(f"\nwrote {results_path}, " + ", ".join(written))


if __name__ == "__main__":
    _ARGS = define_flags()
    flags.mark_flags_as_required(["model", "pairs"])
    cli.run(lambda argv: main(argv, _ARGS))