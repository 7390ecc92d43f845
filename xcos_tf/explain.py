"""Explain one face verification: score, decision, and the picture of why.

`python -m xcos_tf.explain PHOTO_A PHOTO_B --model DIR [--out pair.png] [--json]`

Raw photos are detected and aligned with YuNet (the largest face when there are several);
aligned 112x112 crops are taken as they are. The picture shows both aligned faces with the
cell grid, the cos map (which cells match) and the attention map (which cells counted), with
their values written in, and both maps laid over the faces.

Library use (the web demo calls these):

```python
result = explain_photos("a.jpg", "b.jpg", runtime.load("exported/default"), FaceAligner(YUNET, choose="largest"))
picture = render_explanation(result["face_a"], result["face_b"], result, threshold=result["threshold"])
```

No TensorFlow import here: with a TFLite or ONNX runtime, explain runs without it.
"""
import json
import os
import sys
import types

import matplotlib.colors
import numpy as np
from absl import app, flags

# A Figure on an Agg canvas, never pyplot: no window, no global backend switch for whoever
# imports this module, and safe in the demo's server threads.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from xcos_tf import runtime  # numpy only; the chosen format's backend is imported by `load`
from xcos_tf.data import align
from xcos_tf.paths import DEFAULT_DETECTOR

COS_CMAP = "RdBu"  # red: the cells differ, blue: they match (colour-blind safe)
ATTENTION_CMAP = "viridis"
OVERLAY_ALPHA = 0.55
VEIL_ALPHA = 0.75  # how dark the cells with the least attention get
EXIT_BAD_INPUT = 2
# Faces are searched for in a copy at most this large: YuNet misses a face that fills a large
# photo (measured: an LFW close-up scaled to 1600 px: no face; to 1000 px: a box on half the
# face; to 640 px: found).
DETECTION_MAX_SIDE = 640


def decide(score, threshold):
    """"same" when score >= threshold, else "different"; None without a threshold."""
    if threshold is None:
        return None
    return "same" if float(score) >= float(threshold) else "different"


def _single_map(result, key):
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


def _cos_norm(threshold):
    # Centred at the decision threshold, so blue/red reads as "above/below what decides".
    centre = 0.0 if threshold is None else float(np.clip(threshold, -0.99, 0.99))
    return matplotlib.colors.TwoSlopeNorm(vcenter=centre, vmin=-1.0, vmax=1.0)


def _title(score, threshold, title):
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


def _face_panel(ax, face, cells, label):
    ax.imshow(face, interpolation="bilinear")
    _draw_grid(ax, face.shape[:2], cells)
    ax.set_title(label, fontsize=9)
    ax.set_axis_off()


def _map_panel(ax, values, cmap, norm, fmt, label):
    image = ax.imshow(values, cmap=cmap, norm=norm, interpolation="nearest")
    _write_values(ax, values, image, fmt)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(label, fontsize=9)
    return image


def _overlay_panel(ax, face, values, cmap, norm, label):
    height, width = face.shape[:2]
    ax.imshow(face, interpolation="bilinear")
    ax.imshow(values, cmap=cmap, norm=norm, alpha=OVERLAY_ALPHA, interpolation="nearest",
              extent=(-0.5, width - 0.5, height - 0.5, -0.5))
    _draw_grid(ax, (height, width), values.shape, color="black")
    ax.set_title(label, fontsize=9)
    ax.set_axis_off()


def _spotlight_panel(ax, face, attention_map, label):
    """The face under a black veil that lifts where the attention is high: what counted."""
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


def render_explanation(face_a, face_b, result, threshold=None, title=None):
    """Draws the explanation of one verified pair; returns the picture as RGB uint8 [H, W, 3].

    See `explanation_figure` for the layout and the arguments.
    """
    figure = explanation_figure(face_a, face_b, result, threshold=threshold, title=title)
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def explanation_figure(face_a, face_b, result, threshold=None, title=None):
    """The explanation of one verified pair as a matplotlib `Figure` (Agg canvas, no pyplot).

    Layout (2 rows x 4 panels, about 1300x760 pixels): top row: face A and face B with the
    cell grid, the cos map and the attention map with every cell's value written in (the
    attention in % of the score's weight) and a colour bar each; bottom row: the cos map laid
    over face A and face B (which parts match: blue, which differ: red) and the attention map
    laid over face A and face B (which parts counted). The cos colours are centred at the
    threshold. The title gives the score and the decision (or says that there is no
    threshold).

    Args:
        face_a, face_b: aligned faces, RGB [H, W, 3] (uint8 or float 0..255).
        result: dict with `"score"` (a float or [1]), `"cos_map"` and `"attention_map"`
            ((H, W) or [1, H, W]), e.g. a runtime's `verify` output or `explain_photos`'s.
        threshold: float or None, the model's calibrated decision threshold.
        title: optional str, a first title line (e.g. the two file names).
    """
    face_a, face_b = _single_face(face_a, "face_a"), _single_face(face_b, "face_b")
    cos_map, attention_map = _single_map(result, "cos_map"), _single_map(result, "attention_map")
    if cos_map.shape != attention_map.shape:
        raise ValueError(f"cos_map {cos_map.shape} and attention_map {attention_map.shape} differ in shape")
    score = float(np.asarray(result["score"]).reshape(-1)[0])
    cells = cos_map.shape
    cos_norm = _cos_norm(threshold)

    figure = Figure(figsize=(13.0, 7.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself as figure.canvas
    axes = figure.subplots(2, 4)
    _face_panel(axes[0, 0], face_a, cells, "face A (aligned)")
    _face_panel(axes[0, 1], face_b, cells, "face B (aligned)")
    cos_image = _map_panel(axes[0, 2], cos_map, COS_CMAP, cos_norm, lambda v: f"{v:.2f}",
                           "cos map: how alike each cell is")
    attention_image = _map_panel(axes[0, 3], attention_map * 100.0, ATTENTION_CMAP,
                                 matplotlib.colors.Normalize(0.0, max(float(attention_map.max()) * 100.0, 1e-6)),
                                 lambda v: f"{v:.1f}", "attention: % of the score per cell")
    _overlay_panel(axes[1, 0], face_a, cos_map, COS_CMAP, cos_norm, "cos on A: blue match, red differ")
    _overlay_panel(axes[1, 1], face_b, cos_map, COS_CMAP, cos_norm, "cos on B: blue match, red differ")
    _spotlight_panel(axes[1, 2], face_a, attention_map, "attention on A: bright = counted")
    _spotlight_panel(axes[1, 3], face_b, attention_map, "attention on B: bright = counted")
    cos_bar = figure.colorbar(cos_image, ax=axes[0, 2])
    centre = "" if threshold is None else f", centred at the threshold {threshold:.2f}"
    cos_bar.set_label("cosine" + centre, fontsize=8)
    figure.colorbar(attention_image, ax=axes[0, 3]).set_label("attention, % of the score", fontsize=8)
    figure.suptitle(_title(score, threshold, title), fontsize=12)
    return figure


def save_explanation(path, face_a, face_b, result, threshold=None, title=None):
    """Renders the explanation (see `render_explanation`) and writes it as a PNG at `path`."""
    import cv2  # only for writing; align already depends on OpenCV

    picture = render_explanation(face_a, face_b, result, threshold=threshold, title=title)
    path = os.fspath(path)
    if not cv2.imwrite(path, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
        raise OSError(f"Could not write the picture to {path!r}")
    return picture


def _detection_copy(image):
    """(image scaled to at most `DETECTION_MAX_SIDE` on its longer side, the scale used)."""
    import cv2

    scale = DETECTION_MAX_SIDE / max(image.shape[:2])
    if scale >= 1.0:
        return image, 1.0
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


def align_photo(photo, label, aligner):
    """One photo (a path or an RGB uint8 array) -> (aligned RGB uint8 face, note or None).

    Aligned 112x112 crops are used as they are. Other photos are searched for faces at most
    `DETECTION_MAX_SIDE` pixels wide or high (YuNet misses faces that fill a large photo),
    and the chosen face is then aligned from the full-resolution photo. The note says when
    the photo held several faces or was taken as a crop. `ImageError` and `FaceError`
    messages name the photo (`label` for arrays, the path for files).
    """
    if isinstance(photo, (str, os.PathLike)):
        name = os.fspath(photo)
        image = align.read_image(name)
    else:
        name = label
        image = np.asarray(photo)
    if align.is_aligned_crop(image):
        return align.aligned_crop(image).image, f"{label}: an aligned 112x112 crop, used as it is"
    small, scale = _detection_copy(image)
    try:
        face = aligner.align(small, assume_aligned=False)
    except align.FaceError as err:
        raise type(err)(f"{name}: {err}") from None
    aligned = face.image if scale == 1.0 else align.align_face(image, face.landmarks / scale)
    if face.num_faces > 1:
        choice = getattr(aligner, "choose", "chosen")
        return aligned, f"{label}: {face.num_faces} faces found in {name}, using the {choice} one"
    return aligned, None


def explain_faces(face_a, face_b, runtime_model, notes=()):
    """Verifies two aligned faces; returns the dict described in `explain_photos`."""
    outputs = runtime_model.verify(face_a[None].astype(np.float32), face_b[None].astype(np.float32))
    score = float(np.asarray(outputs["score"]).reshape(-1)[0])
    threshold = runtime_model.threshold
    threshold = None if threshold is None else float(threshold)
    return {
        "score": score,
        "threshold": threshold,
        "decision": decide(score, threshold),
        "cos_map": _single_map(outputs, "cos_map"),
        "attention_map": _single_map(outputs, "attention_map"),
        "face_a": face_a,
        "face_b": face_b,
        "notes": list(notes),
    }


def explain_photos(photo_a, photo_b, runtime_model, aligner):
    """Aligns two photos, verifies them and returns everything needed to explain the result.

    Args:
        photo_a, photo_b: image paths, or RGB uint8 arrays [H, W, 3]. Aligned 112x112 crops
            are used as they are; other photos go through `aligner`.
        runtime_model: an object with `.verify(image_a, image_b)` -> dict of numpy (score,
            cos_map, attention_map) and `.threshold` (float or None), e.g. `xcos_tf.runtime.load`.
        aligner: `xcos_tf.data.align.FaceAligner` (the CLI uses `choose="largest"`).

    Returns:
        dict: `score` float, `threshold` float or None, `decision` "same" / "different" / None,
        `cos_map` and `attention_map` float32 (H, W), `face_a` and `face_b` the aligned RGB
        uint8 faces, `notes` a list of str (several faces found, crop taken as is).

    Raises:
        `xcos_tf.data.align.ImageError` for an unreadable file, `FaceError` (`NoFaceError`,
        `FaceTooSmallError`) when no usable face is found; both `ValueError`s whose message
        names the photo.
    """
    face_a, note_a = align_photo(photo_a, "photo A", aligner)
    face_b, note_b = align_photo(photo_b, "photo B", aligner)
    return explain_faces(face_a, face_b, runtime_model, [note for note in (note_a, note_b) if note])


def explanation_json(result):
    """The JSON-ready part of an `explain_photos` result: numbers and maps, no images."""
    return {
        "score": result["score"],
        "decision": result["decision"],
        "threshold": result["threshold"],
        "cos_map": np.asarray(result["cos_map"], np.float64).round(6).tolist(),
        "attention_map": np.asarray(result["attention_map"], np.float64).round(6).tolist(),
        "notes": list(result["notes"]),
    }


def define_flags():
    """The command-line flags, defined only when this module runs as the script: the web demo
    imports it and defines its own `--model`, and absl refuses a flag defined twice."""
    return types.SimpleNamespace(
        model=flags.DEFINE_string("model", None, "Exported model folder (`python -m xcos_tf.export`)."),
        format=flags.DEFINE_enum("format", "saved_model", runtime.FORMATS, "Which of the exported formats to run."),
        out=flags.DEFINE_string("out", "xcos_explanation.png", "Where to write the picture (PNG); empty: none."),
        json=flags.DEFINE_bool("json", False, "Print score, decision, threshold and both maps as JSON."),
        detector=flags.DEFINE_string("detector", DEFAULT_DETECTOR, "YuNet face detector ONNX file."),
    )


def exit_with_error(message):
    """The command-line tools' answer to bad input: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def main(argv, args):
    if len(argv) != 3:
        exit_with_error(f"expected two photos: python -m xcos_tf.explain PHOTO_A PHOTO_B --model DIR. "
                        f"Received: {argv[1:]}")
    # Photos first: a bad photo is reported before the (slow) model load, and aligned crops
    # need no face detector (a fresh clone has none).
    for photo in argv[1:]:
        try:
            image = align.read_image(photo)
        except ValueError as err:  # ImageError
            exit_with_error(str(err))
        if not align.is_aligned_crop(image) and not os.path.isfile(args.detector.value):
            exit_with_error(f"--detector: face detector model not found: {args.detector.value!r} "
                            f"(needed for {photo}, which is not an aligned 112x112 crop)")
    aligner = align.FaceAligner(args.detector.value, choose="largest") if os.path.isfile(args.detector.value) else None
    faces, notes = [], []
    for photo, label in zip(argv[1:], ("photo A", "photo B")):
        try:
            face, note = align_photo(photo, label, aligner)
        except ValueError as err:  # ImageError, FaceError
            exit_with_error(str(err))
        faces.append(face)
        notes += [note] if note else []
    try:
        runtime_model = runtime.load(args.model.value, format=args.format.value)
    except (OSError, ValueError) as err:
        exit_with_error(f"--model {args.model.value}: {err}")
    result = explain_faces(faces[0], faces[1], runtime_model, notes)
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    if result["threshold"] is None:
        print("note: the model's manifest has no calibrated threshold: printing the score only", file=sys.stderr)
    if args.out.value:
        title = f"{os.path.basename(argv[1])}  vs  {os.path.basename(argv[2])}"
        try:
            save_explanation(args.out.value, faces[0], faces[1], result, threshold=result["threshold"], title=title)
        except OSError as err:
            exit_with_error(f"--out: {err}")
    if args.json.value:
        print(json.dumps(explanation_json(result)))
        return
    line = f"score {result['score']:.4f}"
    if result["decision"] is not None:
        line += f"  {result['decision']}  (threshold {result['threshold']:.4f})"
    print(line)
    if args.out.value:
        print(f"picture: {args.out.value}")


if __name__ == "__main__":
    _ARGS = define_flags()
    flags.mark_flag_as_required("model")
    app.run(lambda argv: main(argv, _ARGS))
