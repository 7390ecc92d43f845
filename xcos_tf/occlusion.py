"""Occluders and cell deletion on aligned faces, for the evaluation of the maps
(`xcos_tf.evaluate`): where sunglasses, a mask, a random square or a dark band over both eyes
fall on the ArcFace template, and which grid cells they cover; and the randomised occluders of
occlusion training (`training_occlusion`, `xcos_tf.data.occluded_features`)."""
import numpy as np

from xcos_tf.data import align

OCCLUDERS = ("sunglasses", "mask", "square", "eye_band")
TRAINING_OCCLUDERS = ("dark_band", "grey_rectangle", "lower_face")
GREY = 127.5  # a deleted cell: mid-grey, which the backbone maps to 0
SQUARE_SIZE = 40  # side of the random square, px of the 112 face (2.5 cells)
EYE_BAND_HALF_HEIGHT = 12  # px above and below the eye line: brows to cheekbones

_LEFT_EYE, _RIGHT_EYE, _NOSE, _LEFT_MOUTH, _RIGHT_MOUTH = align.TEMPLATE_112


def occluder_box(kind, rng=None, size=align.ALIGNED_SIZE):
    """(x0, y0, x1, y1) of an occluder on an aligned face, from the ArcFace template.

    `sunglasses` spans both eyes from brow to cheekbone, `mask` the nose (from halfway up),
    the mouth and the chin, as a surgical mask does; `square` is a `SQUARE_SIZE` square at a random place (needs `rng`);
    `eye_band` a black band across the whole face over both eyes (the issue 14 test of a new user).
    """
    if kind == "sunglasses":
        eye_y = 0.5 * (_LEFT_EYE[1] + _RIGHT_EYE[1])
        box = (_LEFT_EYE[0] - 22, eye_y - 14, _RIGHT_EYE[0] + 22, eye_y + 12)
    elif kind == "mask":
        box = (_LEFT_MOUTH[0] - 24, _NOSE[1] - 8, _RIGHT_MOUTH[0] + 24, size)
    elif kind == "eye_band":
        eye_y = 0.5 * (_LEFT_EYE[1] + _RIGHT_EYE[1])
        box = (0, eye_y - EYE_BAND_HALF_HEIGHT, size, eye_y + EYE_BAND_HALF_HEIGHT)
    elif kind == "square":
        x0, y0 = rng.integers(0, size - SQUARE_SIZE + 1, size=2)
        box = (x0, y0, x0 + SQUARE_SIZE, y0 + SQUARE_SIZE)
    else:
        raise ValueError(f"Unknown occluder {kind!r}; valid choices: {', '.join(OCCLUDERS)}.")
    return tuple(int(np.clip(round(v), 0, size)) for v in box)


def occlude(face, kind, rng):
    """A copy of `face` with the occluder pasted on, and the occluder's mask bool [H, W]."""
    box = occluder_box(kind, rng, size=face.shape[0])
    colour = {"sunglasses": (20, 20, 20), "mask": (175, 205, 230), "eye_band": (0, 0, 0)}.get(kind)
    if colour is None:
        colour = rng.integers(0, 256, size=3)
    return _paste(face, box, colour)


def training_occlusion(face, rng):
    """A copy of `face` with a random occluder of `TRAINING_OCCLUDERS` pasted on, and its mask
    bool [H, W]. Each kind varies in place, size and colour around the template
    (the evaluation's fixed `OCCLUDERS` are single points of these families):
    `dark_band` a band across the face over the eyes (8 to 16 px above and below a line up to
    6 px off the eyes, grey level 0 to 60); `grey_rectangle` a 24 to 56 px rectangle anywhere,
    any grey level; `lower_face` a mask-like block of any colour from around the nose down.
    """
    size = face.shape[0]
    kind = TRAINING_OCCLUDERS[rng.integers(len(TRAINING_OCCLUDERS))]
    if kind == "dark_band":
        half, centre = rng.integers(8, 17), 0.5 * (_LEFT_EYE[1] + _RIGHT_EYE[1]) + rng.integers(-6, 7)
        box, colour = (0, centre - half, size, centre + half), np.full(3, rng.integers(0, 61))
    elif kind == "grey_rectangle":
        width, height = rng.integers(24, 57, size=2)
        x0, y0 = rng.integers(0, size - width + 1), rng.integers(0, size - height + 1)
        box, colour = (x0, y0, x0 + width, y0 + height), np.full(3, rng.integers(0, 256))
    else:
        left, right = rng.integers(12, 33, size=2)
        box = (_LEFT_MOUTH[0] - left, _NOSE[1] + rng.integers(-12, 9), _RIGHT_MOUTH[0] + right, size)
        colour = rng.integers(0, 256, size=3)
    box = tuple(int(np.clip(round(v), 0, size)) for v in box)
    return _paste(face, box, colour)


def _paste(face, box, colour):
    x0, y0, x1, y1 = box
    occluded = face.copy()
    occluded[y0:y1, x0:x1] = colour
    mask = np.zeros(face.shape[:2], bool)
    mask[y0:y1, x0:x1] = True
    return occluded, mask


def cell_coverage(mask, cells):
    """The share of each grid cell's pixels that `mask` covers: float [rows, cols]."""
    rows, cols = cells
    height, width = mask.shape
    return mask.reshape(rows, height // rows, cols, width // cols).mean(axis=(1, 3))


def grey_cells(face, cell_indices, cells):
    """float32 copy of `face` with the given flat cell indices set to grey."""
    rows, cols = cells
    cell_h, cell_w = face.shape[0] // rows, face.shape[1] // cols
    greyed = face.astype(np.float32)
    for index in cell_indices:
        i, j = divmod(int(index), cols)
        greyed[i * cell_h:(i + 1) * cell_h, j * cell_w:(j + 1) * cell_w] = GREY
    return greyed
