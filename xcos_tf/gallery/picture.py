"""The search picture: each probe beside its top hits, each hit with its cos map and attention map.

One row per (probe, hit): the probe's aligned face, the hit's aligned face (person, photo and
score in the title), the cos map laid over the hit (blue: the cells match, red: they differ,
centred at 0) and the hit under the attention veil (bright: the cells that counted).
The panels are `xcos_tf.explain_picture`'s, so they read as in the pair explanation.
"""
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from xcos_tf import explain_picture

MAX_ROWS = 24  # a picture stays readable; the JSON has every hit


def search_figure(results, threshold=None):
    """`results`: [(probe label, probe face RGB uint8, hits with an aligned `face` each)]."""
    rows = [(label, probe, hit) for label, probe, hits in results for hit in hits][:MAX_ROWS]
    if not rows:
        raise ValueError("nothing to draw: no probe has a hit")
    figure = Figure(figsize=(10.0, 2.6 * len(rows)), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), 4, squeeze=False)
    norm = explain_picture.cos_norm()  # the pair picture's colours
    for row, (label, probe, hit) in zip(axes, rows):
        cos_map = np.asarray(hit["cos_map"], np.float32)
        attention_map = np.asarray(hit["attention_map"], np.float32)
        verdict = "" if threshold is None else ("  same" if hit["score"] >= threshold else "  different")
        explain_picture.face_panel(row[0], probe, cos_map.shape, f"probe: {label}")
        explain_picture.face_panel(row[1], hit["face"], cos_map.shape,
                            f"{hit['identity']}: {hit['score']:.3f}{verdict}\n{os.path.basename(hit['photo'])}")
        explain_picture.overlay_panel(row[2], hit["face"], cos_map, norm, "cos: blue match, red differ")
        explain_picture.spotlight_panel(row[3], hit["face"], attention_map, "attention: bright = counted")
    return figure


def render_search(results, threshold=None):
    """`search_figure` drawn: RGB uint8 [H, W, 3]."""
    figure = search_figure(results, threshold)
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def save_search_picture(path, results, threshold=None):
    """Draws `search_figure` and writes it as a PNG at `path`; returns the RGB uint8 picture."""
    import cv2

    picture = render_search(results, threshold)
    if not cv2.imwrite(os.fspath(path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write the picture to {os.fspath(path)!r}")
    return picture


def with_faces(model, results):
    """`results` with each hit's aligned face, from its enrolled photo (the index keeps no pictures)."""
    return [(label, face, [dict(hit, face=model.align(hit["photo"], label=hit["photo"])[0]) for hit in hits])
            for label, face, hits in results]
