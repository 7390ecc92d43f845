"""Grad-CAM for a pair of faces, on the grid layer, in closed form (numpy only).

The baseline the official xCos code ships (`GradCam.py`, after Selvaraju et al., "Grad-CAM",
ICCV 2017): back-propagate the plain cosine of the two faces' embeddings to a 7x7 feature map
of each face, average the gradient over the cells to get one weight per channel, and weigh the
feature map's channels with them. Here the feature map is the model's grid (the grid head's
output, [7, 7, C]) and the embedding is that grid flattened and L2-normalised, exactly as
`embed` computes it. The cosine is then a function of the two grids alone, so its gradient is
known in closed form:

    u, v = flatten(grid_a), flatten(grid_b)
    cos = <u, v> / (|u| |v|)
    d cos / d v = u / (|u| |v|) - cos * v / |v|^2          (and the same with u, v swapped)

No autodiff and no TensorFlow: the grids that every exported format's `embed` returns
(SavedModel, TFLite, ONNX) are enough.

Two choices differ from the official code, both so that maps can be compared across pairs and
with the other methods' contribution maps:
- the map is **signed** (no ReLU): a positive cell is one whose features, weighted by the
  channels that raise the cosine, push the score up; a negative cell pulls it down. The
  official map is `relu` of this one, min-max scaled and inverted;
- no min-max scaling: values keep their size, so a weak explanation looks weak.

Grad-CAM is not exact: the cells' values do not add up to the cosine (the cosine does not
change when a grid is scaled, so the full gradient times the grid sums to 0 over all cells;
the channel averaging is what makes the map non-zero at all). It is a first-order saliency,
the baseline the exact decomposition and xCos are measured against.
"""
import numpy as np

NORM_EPSILON = 1e-12  # as keras.layers.UnitNormalization: a zero grid gets a zero gradient, not NaN


def _flat_grids(grid_a, grid_b):
    grid_a, grid_b = np.asarray(grid_a, np.float64), np.asarray(grid_b, np.float64)
    if grid_a.ndim != 4 or grid_a.shape != grid_b.shape:
        raise ValueError(f"`grid_a` and `grid_b` must be grids of one shape [N, H, W, C]. "
                         f"Received: shapes {grid_a.shape} and {grid_b.shape}")
    if not (np.isfinite(grid_a).all() and np.isfinite(grid_b).all()):
        raise ValueError("`grid_a` and `grid_b` must be finite.")
    return grid_a.reshape(len(grid_a), -1), grid_b.reshape(len(grid_b), -1)


def cosine_gradients(grid_a, grid_b):
    """The cosine of the flattened grids and its gradient with respect to each grid.

    Args:
        grid_a, grid_b: float arrays [N, H, W, C], the two faces' grids (`embed`'s `"grid"`).

    Returns:
        (cosine [N], d cosine / d grid_a [N, H, W, C], d cosine / d grid_b [N, H, W, C]),
        float64.
    """
    u, v = _flat_grids(grid_a, grid_b)
    norm_u = np.maximum(np.linalg.norm(u, axis=1, keepdims=True), NORM_EPSILON)
    norm_v = np.maximum(np.linalg.norm(v, axis=1, keepdims=True), NORM_EPSILON)
    cosine = np.sum(u * v, axis=1, keepdims=True) / (norm_u * norm_v)
    gradient_u = v / (norm_u * norm_v) - cosine * u / norm_u**2
    gradient_v = u / (norm_u * norm_v) - cosine * v / norm_v**2
    shape = np.shape(grid_a)
    return cosine[:, 0], gradient_u.reshape(shape), gradient_v.reshape(shape)


def gradcam_map(grid, gradient):
    """Grad-CAM of one face: channel weights = the gradient averaged over the cells, map =
    the channel-weighted sum of the grid, signed. [N, H, W, C] twice -> [N, H, W]."""
    channel_weights = np.mean(gradient, axis=(1, 2), keepdims=True)
    return np.sum(channel_weights * grid, axis=-1)


def grid_gradcam(grid_a, grid_b):
    """Grad-CAM maps of both faces of each pair for the plain cosine of their embeddings.

    Args:
        grid_a, grid_b: float arrays [N, H, W, C], the two faces' grids (`embed`'s `"grid"`).

    Returns:
        dict of float32 arrays: `"score"` [N] the plain cosine of the two embeddings (the score
        the maps explain), `"gradcam_a"` and `"gradcam_b"` [N, H, W] each face's signed
        Grad-CAM map, and `"contribution_map"` [N, H, W] their mean: one map per pair, the
        way xCos's `cos_map * attention_map` and the exact decomposition give one.
    """
    cosine, gradient_a, gradient_b = cosine_gradients(grid_a, grid_b)
    gradcam_a = gradcam_map(np.asarray(grid_a, np.float64), gradient_a)
    gradcam_b = gradcam_map(np.asarray(grid_b, np.float64), gradient_b)
    return {
        "score": cosine.astype(np.float32),
        "gradcam_a": gradcam_a.astype(np.float32),
        "gradcam_b": gradcam_b.astype(np.float32),
        "contribution_map": ((gradcam_a + gradcam_b) / 2.0).astype(np.float32),
    }
