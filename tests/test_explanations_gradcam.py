"""Grad-CAM on the grid layer: the closed-form gradient against finite differences and autodiff."""
import numpy as np
import pytest
import tiny_verifiers

from xcos_tf.explanations import gradcam


@pytest.fixture(scope="module")
def tiny_grids():
    """Grids and embeddings of two pairs of faces from the tiny learned-attention model."""
    runtime = tiny_verifiers.learned_runtime()
    faces = tiny_verifiers.smooth_faces(4, seed=3).astype(np.float32)
    outputs = runtime.embed(faces)
    return outputs["grid"].astype(np.float64), outputs["embedding"].astype(np.float64)


def _cosine(grid_a, grid_b):
    """The plain cosine of two flattened grids, written out independently of the module."""
    u, v = grid_a.ravel(), grid_b.ravel()
    return u @ v / np.sqrt((u @ u) * (v @ v))


def test_score_is_the_cosine_of_the_models_own_embeddings(tiny_grids):
    grids, embeddings = tiny_grids
    result = gradcam.grid_gradcam(grids[:2], grids[2:])
    np.testing.assert_allclose(result["score"], np.sum(embeddings[:2] * embeddings[2:], axis=1), atol=1e-5)


def test_gradient_matches_central_finite_differences(tiny_grids):
    grids, _ = tiny_grids
    grid_a, grid_b = grids[:1], grids[2:3]
    _, gradient_a, gradient_b = gradcam.cosine_gradients(grid_a, grid_b)
    rng = np.random.default_rng(0)
    step = 1e-6 * np.abs(grids).mean()
    # Every element would be 1568 x 2 cosines; 60 random elements of each grid test the formula.
    for side, gradient in (("a", gradient_a), ("b", gradient_b)):
        for flat_index in rng.choice(grid_a.size, size=60, replace=False):
            index = np.unravel_index(flat_index, grid_a.shape)
            plus, minus = grid_a.copy(), grid_a.copy()
            other = grid_b
            if side == "b":
                plus, minus, other = grid_b.copy(), grid_b.copy(), grid_a
            plus[index] += step
            minus[index] -= step
            if side == "a":
                numeric = (_cosine(plus, other) - _cosine(minus, other)) / (2 * step)
            else:
                numeric = (_cosine(other, plus) - _cosine(other, minus)) / (2 * step)
            assert gradient[index] == pytest.approx(numeric, rel=1e-5, abs=1e-9), (side, index)


def test_gradient_matches_autodiff_through_the_exported_embedding_layers(tiny_grids):
    """The same gradient from TensorFlow through the layers `embed` uses (Flatten, UnitNormalization)."""
    import keras
    import tensorflow as tf

    grids, _ = tiny_grids
    grid_a, grid_b = tf.constant(grids[:2], tf.float32), tf.constant(grids[2:], tf.float32)
    flat_unit = keras.Sequential([keras.layers.Flatten(), keras.layers.UnitNormalization()])
    with tf.GradientTape() as tape:
        tape.watch(grid_b)
        cosine = tf.reduce_sum(flat_unit(grid_a) * flat_unit(grid_b), axis=1)
    autodiff = tape.gradient(cosine, grid_b).numpy()
    _, _, closed_form = gradcam.cosine_gradients(grids[:2], grids[2:])
    np.testing.assert_allclose(closed_form, autodiff, atol=1e-6 * np.abs(autodiff).max())


def test_maps_weigh_the_channels_with_the_cell_averaged_gradient(tiny_grids):
    grids, _ = tiny_grids
    result = gradcam.grid_gradcam(grids[:2], grids[2:])
    _, gradient_a, gradient_b = gradcam.cosine_gradients(grids[:2], grids[2:])
    for key, grid, gradient in (("gradcam_a", grids[:2], gradient_a), ("gradcam_b", grids[2:], gradient_b)):
        for n in range(2):
            weights = gradient[n].reshape(-1, grid.shape[-1]).mean(axis=0)  # one weight per channel
            expected = np.einsum("hwc,c->hw", grid[n], weights)
            np.testing.assert_allclose(result[key][n], expected, rtol=1e-5, atol=1e-7)
    assert result["gradcam_a"].shape == (2, 7, 7) and result["gradcam_a"].dtype == np.float32
    np.testing.assert_allclose(result["contribution_map"], (result["gradcam_a"] + result["gradcam_b"]) / 2, atol=1e-7)
    # Signed (the official map is the ReLU of this one): grids of both signs give cells of both signs.
    signed = gradcam.grid_gradcam(*np.random.default_rng(2).normal(size=(2, 1, 7, 7, 8)))
    assert (signed["gradcam_b"] < 0).any() and (signed["gradcam_b"] > 0).any()


def test_maps_do_not_change_when_a_grid_is_scaled(tiny_grids):
    """The cosine ignores a grid's scale; the gradient scales by 1/k and the features by k."""
    grids, _ = tiny_grids
    plain = gradcam.grid_gradcam(grids[:2], grids[2:])
    scaled = gradcam.grid_gradcam(grids[:2], 5.0 * grids[2:])
    for key in ("score", "gradcam_a", "gradcam_b"):
        np.testing.assert_allclose(scaled[key], plain[key], rtol=1e-5, atol=1e-7)


def test_zero_grid_gives_zero_maps_and_bad_shapes_are_named():
    grid = np.random.default_rng(1).normal(size=(1, 7, 7, 4))
    result = gradcam.grid_gradcam(grid, np.zeros_like(grid))
    for key in ("score", "gradcam_a", "gradcam_b"):
        assert np.isfinite(result[key]).all() and not result[key].any()
    with pytest.raises(ValueError, match="one shape"):
        gradcam.grid_gradcam(grid, grid[:, :6])
    with pytest.raises(ValueError, match="finite"):
        gradcam.grid_gradcam(grid, np.full_like(grid, np.nan))
