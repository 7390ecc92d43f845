"""The explanation picture of one verified pair: the faces, then one row per explanation method.

```python
result = explain.explain_faces(face_a, face_b, runtime_model, methods=("xcos", "gradcam"))
picture = render_explanation(result["face_a"], result["face_b"], result, title="a.jpg  vs  b.jpg")
```

Layout (1500 pixels wide; 560 high with one method, 300 more per further method):
- header: face A and face B as the model saw them, with the 7x7 cell grid, and a text panel:
  what the colours mean and the notes (several faces in a photo, a crop used as it is, a method
  this model cannot run);
- one row per method, five panels, the same for every method so that rows compare: the
  method's map laid over face A and over face B, its `contribution_map` with every cell's
  value written in, then the method's own maps (xcos: cos map and attention; gradcam: each
  face's map; decomposition: the sum that the cells add up to).

Colour scales: contributions (and the Grad-CAM maps) on a red-white-blue scale centred at 0,
symmetric, its range a round number printed on the colour bar (blue raises the score, red
lowers it); the cos map on -1..1 centred at 0, even ticks; the attention on one fixed scale
for every picture (0 to 50 % of the score, square-root spaced so that small shares differ).

No pyplot: a Figure on an Agg canvas, so no window, no global backend switch for whoever
imports this module, and safe in the demo's server threads.
"""
import os

import matplotlib.colors
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DIVERGING_CMAP = "RdBu"  # red: lowers the score / the cells differ; blue: raises / they match (colour-blind safe)
ATTENTION_CMAP = "viridis"
ATTENTION_MAX_PERCENT = 50.0  # the fixed top of the attention scale: the shipped model's largest cell share
# ranged 9 % to 41 % on 400 glint sample pairs (docs/explain_and_evaluate.md); a larger share is drawn in the top colour
ATTENTION_TICKS = (0, 2, 10, 25, 50)  # 2 %: every cell alike (1/49)
OVERLAY_ALPHA = 0.55
VEIL_ALPHA = 0.75  # how dark the cells with the least attention get under the spotlight
WIDTH_INCHES, HEADER_INCHES, ROW_INCHES, DPI = 15.0, 2.6, 3.0, 100
METHOD_TITLES = {
    "xcos": "xCos: the score is the sum over the cells of cos x attention (exact)",
    "decomposition": "Exact decomposition of the teacher's cosine: the cells' contributions plus a constant",
    "gradcam": "Grad-CAM (signed, on the grid) of the embedding cosine: a saliency, its cells do not add up",
}


def decide(score, threshold):
    """"same" when score >= threshold, else "different"; None without a threshold."""
    if threshold is None:
        return None
    return "same" if float(score) >= float(threshold) else "different"


def single_map(result, key):
    """`result[key]` as one float32 (H, W) map ((H, W) or [1, H, W] accepted)."""
    value = np.asarray(result[key], dtype=np.float32)
    if value.ndim == 3 and value.shape[0] == 1:
        value = value[0]
    if value.ndim != 2:
        raise ValueError(f"`result[{key!r}]` must be one (H, W) map. Received shape {value.shape}")
    return value


def _single_face(face, name):
    face = np.asarray(face)
    if face.ndim != 3 or face.shape[2] != 3:
        raise ValueError(f"`{name}` must be an RGB image [H, W, 3]. Received shape {face.shape}")
    return np.clip(face, 0, 255).astype(np.uint8)


def round_range(values):
    """The smallest of 1, 2, 5 x 10^k at least as large as max |values|: a symmetric range with even ticks."""
    largest = float(np.max(np.abs(values)))
    if not np.isfinite(largest) or largest == 0.0:
        return 1.0
    power = 10.0 ** np.floor(np.log10(largest))
    return next(step * power for step in (1.0, 2.0, 5.0, 10.0) if step * power >= largest * (1 - 1e-9))


def _headline(score, threshold, title):
    decision = decide(score, threshold)
    if decision is None:
        headline = f"xCos score {score:.3f}  (no calibrated threshold in the model: no decision)"
    else:
        verdict = "SAME person" if decision == "same" else "DIFFERENT people"
        headline = f"xCos score {score:.3f}: {verdict}  (threshold {threshold:.3f})"
    return headline if not title else f"{title}\n{headline}"


def _draw_grid(ax, size, cells, color="white"):
    height, width = size
    rows, cols = cells
    for i in range(1, rows):
        ax.axhline(i * height / rows - 0.5, color=color, linewidth=0.6, alpha=0.8)
    for j in range(1, cols):
        ax.axvline(j * width / cols - 0.5, color=color, linewidth=0.6, alpha=0.8)


def _write_values(ax, values, image, fmt):
    """Writes each cell's value, black on light cells and white on dark ones."""
    rgba = image.cmap(image.norm(values))
    luminance = rgba[..., :3] @ np.array([0.299, 0.587, 0.114])
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, fmt(value), ha="center", va="center", fontsize=7,
                color="black" if luminance[i, j] > 0.5 else "white")


def face_panel(ax, face, cells, label):
    """An aligned face with the cell grid (the gallery's search picture draws its faces with it too)."""
    ax.imshow(face, interpolation="bilinear")
    _draw_grid(ax, face.shape[:2], cells)
    ax.set_title(label, fontsize=9)
    ax.set_axis_off()


def _map_panel(figure, ax, values, cmap, norm, fmt, label, bar_label, ticks=None, extend="neither"):
    image = ax.imshow(values, cmap=cmap, norm=norm, interpolation="nearest")
    _write_values(ax, values, image, fmt)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(label, fontsize=9)
    bar = figure.colorbar(image, ax=ax, ticks=ticks, extend=extend, shrink=0.9)
    bar.set_label(bar_label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return image


def cos_norm():
    """The cos map's colour scale: -1..1, centred at 0 (white: unrelated cells)."""
    return matplotlib.colors.Normalize(-1.0, 1.0)


def overlay_panel(ax, face, values, norm, label):
    """`values` in red-white-blue laid over the face, cell by cell."""
    height, width = face.shape[:2]
    ax.imshow(face, interpolation="bilinear")
    ax.imshow(values, cmap=DIVERGING_CMAP, norm=norm, alpha=OVERLAY_ALPHA, interpolation="nearest",
              extent=(-0.5, width - 0.5, height - 0.5, -0.5))
    _draw_grid(ax, (height, width), values.shape, color="black")
    ax.set_title(label, fontsize=9)
    ax.set_axis_off()


def spotlight_panel(ax, face, attention_map, label):
    """The face under a black veil that lifts where the attention is high: what counted (the
    gallery's search picture; the pair picture writes the attention's values instead)."""
    height, width = face.shape[:2]
    veil = np.zeros(attention_map.shape + (4,), np.float32)
    # The square root lifts the veil visibly for cells with a moderate share, not only the top one.
    share = np.sqrt(np.clip(attention_map, 0.0, None) / max(float(attention_map.max()), 1e-12))
    veil[..., 3] = VEIL_ALPHA * (1.0 - share)
    ax.imshow(face, interpolation="bilinear")
    ax.imshow(veil, interpolation="nearest", extent=(-0.5, width - 0.5, height - 0.5, -0.5))
    _draw_grid(ax, (height, width), attention_map.shape, color="grey")
    ax.set_title(label, fontsize=9)
    ax.set_axis_off()


def _text_panel(ax, lines):
    ax.set_axis_off()
    ax.text(0.0, 1.0, "\n".join(lines), ha="left", va="top", fontsize=9, wrap=True, transform=ax.transAxes)


def _signed_norm(*maps):
    limit = round_range(np.stack(maps))
    return matplotlib.colors.Normalize(-limit, limit), np.linspace(-limit, limit, 5), limit


def _value_format(limit):
    """(format of a cell's value, note for the panel title): two decimals from a range of ±0.1
    up; below, the values x 10^k, the range then ±10, ±20 or ±50, so that two significant
    digits fit in a cell (one decimal up to ±20). No "-0.0"."""
    if limit >= 0.1:
        return lambda value: f"{round(float(value), 2) + 0.0:.2f}", ""
    scale = 10.0 ** (1 - np.floor(np.log10(limit) + 1e-9))
    decimals = 1 if limit * scale <= 20 * (1 + 1e-9) else 0
    return lambda value: f"{round(float(value) * scale, decimals) + 0.0:.{decimals}f}", f" (values x {scale:g})"


def _contribution_panels(figure, axes, face_a, face_b, map_a, map_b, contribution, what):
    """The first three panels of every row: the maps over the faces, the contributions' values."""
    norm, ticks, limit = _signed_norm(map_a, map_b, contribution)
    overlay_panel(axes[0], face_a, map_a, norm, f"{what} on face A")
    overlay_panel(axes[1], face_b, map_b, norm, f"{what} on face B")
    value_format, scaled = _value_format(limit)
    _map_panel(figure, axes[2], contribution, DIVERGING_CMAP, norm, value_format,
               "contribution per cell" + scaled, f"blue raises, red lowers (±{limit:g})", ticks)
    return norm, ticks, limit


def _xcos_row(figure, axes, face_a, face_b, explanation):
    contribution = single_map(explanation, "contribution_map")
    _contribution_panels(figure, axes, face_a, face_b, contribution, contribution, contribution, "cos x attention")
    _map_panel(figure, axes[3], single_map(explanation, "cos_map"), DIVERGING_CMAP, cos_norm(),
               lambda v: f"{v:.2f}", "cos map: how alike each cell is", "cosine (blue: alike)",
               np.linspace(-1, 1, 5))
    _map_panel(figure, axes[4], 100.0 * single_map(explanation, "attention_map"), ATTENTION_CMAP,
               matplotlib.colors.PowerNorm(0.5, 0.0, ATTENTION_MAX_PERCENT), lambda v: f"{v:.1f}",
               "attention: % of the score per cell", "% of the score (fixed scale)", ATTENTION_TICKS, "max")


def _decomposition_row(figure, axes, face_a, face_b, explanation):
    contribution = single_map(explanation, "contribution_map")
    _contribution_panels(figure, axes, face_a, face_b, contribution, contribution, contribution, "contribution")
    total, bias = float(contribution.sum()), float(explanation["bias"])
    _text_panel(axes[3], [
        f"teacher cosine {explanation['explained_score']:.4f}",
        f"= sum of the 49 cells {total:.4f}",
        f"+ constant {bias:.4f}",
        "",
        "Each cell's share of the original",
        "teacher's cosine, exact (linear tail",
        "after its 7x7 map). The teacher is not",
        "the xCos model: its cosine differs",
        "from the xCos score.",
    ])
    axes[4].set_axis_off()


def _gradcam_row(figure, axes, face_a, face_b, explanation):
    gradcam_a, gradcam_b = single_map(explanation, "gradcam_a"), single_map(explanation, "gradcam_b")
    norm, ticks, limit = _contribution_panels(figure, axes, face_a, face_b, gradcam_a, gradcam_b,
                                              single_map(explanation, "contribution_map"), "Grad-CAM")
    value_format, scaled = _value_format(limit)
    for ax, values, side in ((axes[3], gradcam_a, "A"), (axes[4], gradcam_b, "B")):
        _map_panel(figure, ax, values, DIVERGING_CMAP, norm, value_format, f"Grad-CAM of face {side}{scaled}",
                   f"±{limit:g}", ticks)


ROWS = {"xcos": _xcos_row, "decomposition": _decomposition_row, "gradcam": _gradcam_row}


def _reading_notes(result):
    lines = ["How to read: each face is cut into 7x7 cells of 16x16 pixels.",
             "Contributions: blue cells raise the score, red cells lower it."]
    xcos = result["methods"].get("xcos")
    if xcos is not None:
        cos_map, attention = single_map(xcos, "cos_map"), single_map(xcos, "attention_map")
        # The bottom row is neck, collar and the black border of the aligned crop: alike in
        # almost any two crops, so its cos is high even for two different people.
        lines.append(f"Bottom row (neck, black border of the crop): cos {cos_map[-1].mean():.2f} on average, "
                     f"as in almost any two crops,")
        share = attention[-1].sum()
        # A row of 7 cells holds 1/7 (14 %) of a uniform attention: say whether it gets less.
        verdict = "less than its share of 14 %" if share < 1 / 7 else "at least its share of 14 %"
        lines.append(f"and {100 * share:.1f} % of the attention ({verdict}).")
    lines += [f"Note: {note}" for note in result.get("notes", ())]
    return lines


def explanation_figure(face_a, face_b, result, title=None):
    """The explanation of one verified pair as a matplotlib `Figure` (Agg canvas, no pyplot).

    See the module docstring for the layout.

    Args:
        face_a, face_b: aligned faces, RGB [H, W, 3] (uint8 or float 0..255).
        result: dict as `xcos_tf.explain.explain_faces` returns: `"score"`, `"threshold"`
            (float or None), `"methods"` (method name -> its explanation dict, drawn in this
            order), and optional `"notes"` (list of str, written in the picture) and `"title"`.
        title: optional str, a first title line; defaults to `result["title"]` (the two file
            names when the result comes from `explain_photos`).
    """
    face_a, face_b = _single_face(face_a, "face_a"), _single_face(face_b, "face_b")
    methods = result["methods"]
    unknown = set(methods) - set(ROWS)
    if not methods or unknown:
        raise ValueError(f"`result['methods']` must name some of {sorted(ROWS)}. Received: {sorted(methods)}")
    cells = single_map(next(iter(methods.values())), "contribution_map").shape
    score = float(np.asarray(result["score"]).reshape(-1)[0])

    heights = [HEADER_INCHES] + [ROW_INCHES] * len(methods)
    figure = Figure(figsize=(WIDTH_INCHES, sum(heights)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself as figure.canvas
    header, *rows = np.atleast_1d(figure.subfigures(len(heights), 1, height_ratios=heights))
    grid = header.add_gridspec(1, 5)
    face_panel(header.add_subplot(grid[0, 0]), face_a, cells, "face A (aligned)")
    face_panel(header.add_subplot(grid[0, 1]), face_b, cells, "face B (aligned)")
    _text_panel(header.add_subplot(grid[0, 2:]), _reading_notes(result))
    for row, (name, explanation) in zip(rows, methods.items()):
        ROWS[name](row, row.subplots(1, 5), face_a, face_b, explanation)
        row.suptitle(f"{METHOD_TITLES[name]}  [score explained: {explanation['explained_score']:.3f}]",
                     fontsize=10, fontweight="bold")
    title = result.get("title") if title is None else title
    figure.suptitle(_headline(score, result.get("threshold"), title), fontsize=12)
    return figure


def render_explanation(face_a, face_b, result, title=None):
    """Draws the explanation (see `explanation_figure`); returns the picture as RGB uint8 [H, W, 3]."""
    figure = explanation_figure(face_a, face_b, result, title=title)
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def save_explanation(path, face_a, face_b, result, title=None):
    """Renders the explanation (see `render_explanation`) and writes it as a PNG at `path`."""
    import cv2  # only for writing; align already depends on OpenCV

    picture = render_explanation(face_a, face_b, result, title=title)
    path = os.fspath(path)
    if not cv2.imwrite(path, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
        raise OSError(f"Could not write the picture to {path!r}")
    return picture
