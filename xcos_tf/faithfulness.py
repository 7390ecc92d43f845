"""How faithful each explanation method's maps are, on the same pairs, without human labels:
the faithfulness table of `xcos_tf.evaluate --methods=xcos,decomposition,gradcam`.

Every method (`xcos_tf.explain.METHODS`) gives a 7x7 `contribution_map` for a pair and explains
a score of its own; each curve measures the score that the method explains:
- `xcos`: contribution `cos_map * attention_map`; score: the xCos score (`compare`).
- `decomposition`: the exact contributions of the original teacher's cosine; score: the
  teacher's cosine (the export's `decompose` signature).
- `gradcam`: the signed Grad-CAM map (`explanations.gradcam`); score: the plain cosine of the two
  grids (the 1568-d embedding) that Grad-CAM differentiates.

Measures, all on face B of same-person pairs, face A intact:
- deletion: B's cells are greyed (`occlusion.GREY`) one by one, largest contribution first, and
  the method's score recomputed after each; the mean area under that curve (x from 0 to 1) is
  compared with the same for a random order (one random order per pair, shared by every method).
  Lower than random = the map ranks the cells that carry the score.
- insertion: B starts all grey and its cells are restored, largest contribution first; higher
  than random = faithful.
- occluder localisation: with an occluder (`occlusion.OCCLUDERS`) pasted on B, the share of
  pairs whose lowest-contribution cell is at least half under it, beside chance (the mean share
  of such cells).
- pointing game: the share of pairs whose lowest-contribution cell touches the occluded region
  at all (the usual pointing-game tolerance of one cell), beside chance.
"""
import numpy as np

from xcos_tf.occlusion import grey_cells
from xcos_tf.scoring import compare_grids, decompose_pairs, embed_faces, row_cosine

# What each method's curves measure (its own score), as printed.
EXPLAINED_SCORES = {"xcos": "xCos score", "decomposition": "teacher cosine", "gradcam": "embedding cosine"}


class _XCos:
    def __init__(self, model):
        self.model = model

    def explain(self, faces_a, faces_b):
        _, grid_a = embed_faces(self.model, faces_a)
        _, grid_b = embed_faces(self.model, faces_b)
        outputs = compare_grids(self.model, grid_a, grid_b)
        return outputs["score"], outputs["cos_map"] * outputs["attention_map"]

    def scores(self, face_a, faces_b):
        _, grid_a = embed_faces(self.model, face_a[None])
        _, grid_b = embed_faces(self.model, faces_b)
        return compare_grids(self.model, np.repeat(grid_a, len(grid_b), axis=0), grid_b)["score"]


class _GradCam(_XCos):
    def explain(self, faces_a, faces_b):
        from xcos_tf.explanations import gradcam

        _, grid_a = embed_faces(self.model, faces_a)
        _, grid_b = embed_faces(self.model, faces_b)
        maps = gradcam.grid_gradcam(grid_a, grid_b)
        return maps["score"], maps["contribution_map"]

    def scores(self, face_a, faces_b):
        _, grid_a = embed_faces(self.model, face_a[None])
        _, grid_b = embed_faces(self.model, faces_b)
        return row_cosine(np.repeat(grid_a.reshape(1, -1), len(grid_b), axis=0), grid_b.reshape(len(grid_b), -1))


class _Decomposition(_XCos):
    def explain(self, faces_a, faces_b):
        outputs = decompose_pairs(self.model, faces_a, faces_b)
        return outputs["score"], outputs["contribution_map"]

    def scores(self, face_a, faces_b):
        return decompose_pairs(self.model, np.repeat(face_a[None], len(faces_b), axis=0), faces_b)["score"]


_SCORERS = {"xcos": _XCos, "decomposition": _Decomposition, "gradcam": _GradCam}


def method_scorer(model, method):
    """The object that explains pairs (`explain(faces_a, faces_b) -> (score [N], contribution
    [N, H, W])`) and scores variants of face B (`scores(face_a, faces_b) -> [K]`) for `method`."""
    if method not in _SCORERS:
        raise ValueError(f"`method` must be one of {list(_SCORERS)}. Received: method={method!r}")
    return _SCORERS[method](model)


def cell_curves(scorer, face_a, face_b, order, cells):
    """(deletion, insertion) scores [cells + 1] of face B against face A: column k after greying
    the first k cells of `order` / after restoring them on an all-grey face."""
    count = len(order)
    deleted = [grey_cells(face_b, order[:k], cells) for k in range(count + 1)]
    inserted = [grey_cells(face_b, order[k:], cells) for k in range(count + 1)]
    scores = np.asarray(scorer.scores(face_a, np.stack(deleted + inserted)), np.float32)
    return scores[:count + 1], scores[count + 1:]


def curve_area(curve):
    """Area under a curve sampled at evenly spaced fractions 0..1 (trapezoids)."""
    curve = np.asarray(curve, np.float64)
    return float(np.sum(curve[1:] + curve[:-1]) / (2 * (len(curve) - 1)))


def deletion_insertion(scorer, faces_a, faces_b, contributions, random_orders, progress=None):
    """Deletion and insertion curves of each pair, by contribution and by `random_orders`.

    Returns:
        dict `{"deletion" | "insertion": {"contribution" | "random": float32 [P, cells + 1]}}`.
    """
    cells = contributions.shape[1:]
    curves = {kind: {"contribution": [], "random": []} for kind in ("deletion", "insertion")}
    for pair in range(len(faces_a)):
        orders = {"contribution": np.argsort(-contributions[pair].reshape(-1), kind="stable"),
                  "random": random_orders[pair]}
        for name, order in orders.items():
            deletion, insertion = cell_curves(scorer, faces_a[pair], faces_b[pair], order, cells)
            curves["deletion"][name].append(deletion)
            curves["insertion"][name].append(insertion)
        if progress is not None:
            progress.update(1)
    return {kind: {name: np.array(rows) for name, rows in by_order.items()} for kind, by_order in curves.items()}


def curve_summary(curves):
    """Mean curves, mean AUCs and the share of pairs beating random, per kind of curve."""
    summary = {}
    for kind, by_order in curves.items():
        areas = {name: np.array([curve_area(row) for row in rows]) for name, rows in by_order.items()}
        better = areas["contribution"] < areas["random"] if kind == "deletion" else areas["contribution"] > areas["random"]
        summary[kind] = {
            "contribution_auc": float(areas["contribution"].mean()),
            "random_auc": float(areas["random"].mean()),
            "pairs_better_than_random": float(better.mean()),
            "contribution_curve": by_order["contribution"].mean(axis=0).tolist(),
            "random_curve": by_order["random"].mean(axis=0).tolist(),
        }
    return summary


def localisation(maps, coverages):
    """Where the lowest cell of each map lies against an occluder's cell coverage [N, H, W]:
    `localisation` (that cell at least half covered) and `pointing` (touched at all), each
    beside its chance rate (the mean share of such cells)."""
    flat_maps = maps.reshape(len(maps), -1)
    flat_cover = coverages.reshape(len(coverages), -1)
    lowest_cover = flat_cover[np.arange(len(flat_maps)), np.argmin(flat_maps, axis=1)]
    return {
        "localisation": float(np.mean(lowest_cover >= 0.5)),
        "localisation_chance": float(np.mean(flat_cover >= 0.5)),
        "pointing": float(np.mean(lowest_cover > 0)),
        "pointing_chance": float(np.mean(flat_cover > 0)),
    }


def faithfulness_table(model, methods, faces_a, faces_b, occluded, curve_pairs, rng, progress=None):
    """Every measure of this module for each of `methods` on the same same-person pairs.

    Args:
        model: a runtime (`xcos_tf.runtime.load`); `decompose` is needed for "decomposition".
        methods: names in `EXPLAINED_SCORES`.
        faces_a, faces_b: uint8 [P, 112, 112, 3], same-person pairs.
        occluded: {occluder: (faces_b with it pasted [P, 112, 112, 3], cell coverage [P, H, W])}.
        curve_pairs: int array, which of the P pairs get deletion and insertion curves.
        rng: numpy Generator for the random orders (one per pair, shared by the methods).
        progress: optional object with `update(n)`, advanced once per pair and method.

    Returns:
        JSON-ready `{method: {"explains", "deletion", "insertion", "occluders": {occluder:
        localisation(...)}, "pointing": mean over occluders}}`.
    """
    table, random_orders = {}, None
    for method in methods:
        scorer = method_scorer(model, method)
        row = {"explains": EXPLAINED_SCORES[method]}
        if len(curve_pairs):
            _, contributions = scorer.explain(faces_a[curve_pairs], faces_b[curve_pairs])
            if random_orders is None:
                random_orders = [rng.permutation(contributions[0].size) for _ in curve_pairs]
            row.update(curve_summary(deletion_insertion(
                scorer, faces_a[curve_pairs], faces_b[curve_pairs], contributions, random_orders, progress)))
            row["curve_pairs"] = len(curve_pairs)
        row["occluders"] = {kind: localisation(scorer.explain(faces_a, occluded_b)[1], coverage)
                            for kind, (occluded_b, coverage) in occluded.items()}
        if row["occluders"]:
            row["pointing"] = float(np.mean([hits["pointing"] for hits in row["occluders"].values()]))
        table[method] = row
    return table


LABEL_WIDTH, COLUMN_WIDTH = 46, 22


def format_faithfulness(table, skipped=None):
    """The printed lines of the faithfulness table: one column per method."""
    methods = list(table)

    def row(label, cells):
        return f"  {label}".ljust(LABEL_WIDTH) + "".join(cell.rjust(COLUMN_WIDTH) for cell in cells)

    lines = [row("", methods), row("score the curves measure", [table[m]["explains"] for m in methods])]
    first = table[methods[0]] if methods else {}
    for kind, better in (("deletion", "lower"), ("insertion", "higher")):
        if kind in first:
            label = f"{kind} AUC, {first['curve_pairs']} pairs ({better} better)"
            lines.append(row(label, [f"{table[m][kind]['contribution_auc']:.4f} / {table[m][kind]['random_auc']:.4f}"
                                     for m in methods]) + "   (by contribution / random order)")
    for kind, hits in first.get("occluders", {}).items():
        lines.append(row(f"lowest cell under {kind} (chance {100 * hits['localisation_chance']:.0f} %)",
                         [f"{100 * table[m]['occluders'][kind]['localisation']:.1f} %" for m in methods]))
    if "pointing" in first:
        chance = np.mean([hits["pointing_chance"] for hits in first["occluders"].values()])
        lines.append(row(f"pointing game (chance {100 * chance:.0f} %)", [f"{100 * table[m]['pointing']:.1f} %"
                                                                          for m in methods]))
    lines.extend(f"  {name}: skipped, {reason}" for name, reason in (skipped or {}).items())
    return lines
