"""XCosLayer and GridHead against NumPy references."""
import keras
import numpy as np
import pytest

from tests.layer_checks import run_layer_check
from xcos_tf.layers import GridHead, XCosLayer


def numpy_cos_map(grid_a, grid_b):
    dot = (grid_a * grid_b).sum(-1)
    norms = np.maximum(np.linalg.norm(grid_a, axis=-1), 1e-6) * np.maximum(np.linalg.norm(grid_b, axis=-1), 1e-6)
    return dot / norms


@pytest.fixture
def grids():
    rng = np.random.default_rng(0)
    return rng.normal(size=(3, 7, 7, 32)).astype("float32"), rng.normal(size=(3, 7, 7, 32)).astype("float32")


@pytest.mark.parametrize("symmetric", [True, False])
def test_learned_attention_matches_numpy_reference(grids, symmetric):
    grid_a, grid_b = grids
    out = {k: np.asarray(v) for k, v in XCosLayer(symmetric=symmetric)(grid_a, grid_b).items()}
    np.testing.assert_allclose(out["cos_map"], numpy_cos_map(grid_a, grid_b), atol=1e-5)
    np.testing.assert_allclose(out["attention_map"].sum(axis=(1, 2)), 1.0, atol=1e-5)
    assert (out["attention_map"] > 0).all()
    np.testing.assert_allclose(out["score"], (out["cos_map"] * out["attention_map"]).sum(axis=(1, 2)), atol=1e-5)
    assert (np.abs(out["score"]) <= 1.0).all()


def test_attention_module_is_the_papers_stack(grids):
    layer = XCosLayer()
    layer(*grids)
    kernels = {w.path.split("/")[-2]: tuple(w.shape) for w in layer.weights if w.path.endswith("kernel")}
    # Shared conv3x3 32->16 on each grid, then on the concatenation conv3x3 32->16 and 16->1.
    assert kernels == {"shared_conv": (3, 3, 32, 16), "fuse_conv": (3, 3, 32, 16), "logit_conv": (3, 3, 16, 1)}


def test_symmetric_mode_swaps_exactly(grids):
    layer = XCosLayer(symmetric=True)
    ab, ba = layer(*grids), layer(grids[1], grids[0])
    for key in ("score", "cos_map", "attention_map"):
        np.testing.assert_allclose(np.asarray(ab[key]), np.asarray(ba[key]), atol=1e-6)


def test_asymmetric_mode_is_the_papers_exact_form(grids):
    layer = XCosLayer(symmetric=False)
    layer(*grids)
    # Perturb the BN statistics so the order of the concatenation matters visibly.
    for weight in layer.weights:
        weight.assign(np.random.default_rng(1).normal(size=weight.shape).astype("float32") * 0.5 + (1.0 if "variance" in weight.path else 0.0))
    ab, ba = layer(*grids), layer(grids[1], grids[0])
    assert np.abs(np.asarray(ab["attention_map"]) - np.asarray(ba["attention_map"])).max() > 1e-4


def test_identical_faces_give_a_cos_map_of_ones(grids):
    out = XCosLayer()(grids[0], grids[0])
    np.testing.assert_allclose(np.asarray(out["cos_map"]), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["score"]), 1.0, atol=1e-5)


def test_uniform_mode_is_the_mean_cosine(grids):
    out = XCosLayer(attention="uniform")(*grids)
    np.testing.assert_allclose(np.asarray(out["attention_map"]), 1 / 49, atol=1e-7)
    np.testing.assert_allclose(np.asarray(out["score"]), numpy_cos_map(*grids).mean(axis=(1, 2)), atol=1e-5)


def test_fixed_mode_normalises_the_given_map(grids):
    weights = np.arange(49, dtype="float32").reshape(7, 7)
    out = XCosLayer(attention="fixed", fixed_weights=weights)(*grids)
    np.testing.assert_allclose(np.asarray(out["attention_map"][0]), weights / weights.sum(), atol=1e-6)
    expected = (numpy_cos_map(*grids) * weights / weights.sum()).sum(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(out["score"]), expected, atol=1e-5)


def test_all_zero_cells_give_zero_not_nan(grids):
    grid_a = grids[0].copy()
    grid_a[:, 3, 3, :] = 0
    out = XCosLayer()(grid_a, grids[1])
    assert np.isfinite(np.asarray(out["score"])).all()
    np.testing.assert_array_equal(np.asarray(out["cos_map"])[:, 3, 3], 0.0)


@pytest.mark.parametrize("attention", ["learned", "uniform"])
def test_any_grid_size(attention):
    rng = np.random.default_rng(2)
    grid = rng.normal(size=(2, 5, 9, 8)).astype("float32")
    out = XCosLayer(attention=attention)(grid, grid[::-1])
    assert tuple(out["cos_map"].shape) == (2, 5, 9)
    np.testing.assert_allclose(np.asarray(out["attention_map"]).sum(axis=(1, 2)), 1.0, atol=1e-5)


def test_temperature_flattens_attention(grids):
    layer = XCosLayer(temperature=1.0)
    sharp = layer(*grids)["attention_map"]
    hot = XCosLayer.from_config({**layer.get_config(), "temperature": 100.0})
    hot(*grids)
    hot.set_weights(layer.get_weights())
    flat = hot(*grids)["attention_map"]
    assert np.asarray(flat).std() < np.asarray(sharp).std()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"attention": "soft"}, "attention"),
        ({"attention": "fixed"}, "fixed_weights"),
        ({"attention": "fixed", "fixed_weights": -np.ones((7, 7))}, "fixed_weights"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        XCosLayer(**kwargs)


def test_fixed_weights_must_match_the_grid(grids):
    with pytest.raises(ValueError, match="fixed_weights"):
        XCosLayer(attention="fixed", fixed_weights=np.ones((5, 5)))(*grids)


@pytest.mark.parametrize("attention", ["learned", "uniform"])
def test_xcos_layer_check(grids, attention):
    run_layer_check(
        XCosLayer,
        {"attention": attention},
        grids,
        {"score": (3,), "cos_map": (3, 7, 7), "attention_map": (3, 7, 7)},
    )


def test_grid_head_layer_check():
    feature_map = np.random.default_rng(3).normal(size=(2, 7, 7, 64)).astype("float32")
    run_layer_check(GridHead, {"channels": 32}, (feature_map,), (2, 7, 7, 32))


def test_grid_head_refuses_bad_channels():
    with pytest.raises(ValueError, match="channels"):
        GridHead(0)


def test_layers_round_trip_through_keras_file(tmp_path, grids):
    grid_a, grid_b = keras.Input((7, 7, 64)), keras.Input((7, 7, 64))
    head = GridHead(32)
    outputs = XCosLayer()(head(grid_a), head(grid_b))
    model = keras.Model([grid_a, grid_b], outputs)
    rng = np.random.default_rng(4)
    x = [rng.normal(size=(2, 7, 7, 64)).astype("float32") for _ in range(2)]
    path = tmp_path / "xcos.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    for key, value in model(x).items():
        np.testing.assert_array_equal(np.asarray(reloaded(x)[key]), np.asarray(value))


def test_tf_checkpoint_restores_every_attention_weight(tmp_path, grids):
    """The training loop saves tf.train.Checkpoints: BN statistics of the attention must survive."""
    import tensorflow as tf

    layer = XCosLayer()
    layer(*grids)
    rng = np.random.default_rng(5)
    for weight in layer.weights:
        weight.assign(rng.uniform(0.5, 1.5, size=weight.shape).astype("float32"))
    path = tf.train.Checkpoint(layer=layer).save(str(tmp_path / "ckpt"))
    restored = XCosLayer()
    restored(*grids)
    tf.train.Checkpoint(layer=restored).restore(path).assert_consumed()
    assert len(restored.weights) == len(layer.weights) == 18  # 3 x (conv, 4 BN, PReLU)
    for expected, got in zip(layer.weights, restored.weights):
        np.testing.assert_array_equal(got.numpy(), expected.numpy(), err_msg=expected.path)


# === The attention prior: learned logits added to log(|a_i| |b_i|) ===


def _numpy_norm_product(grid_a, grid_b):
    return np.linalg.norm(grid_a, axis=-1) * np.linalg.norm(grid_b, axis=-1) + 1e-6


def test_attention_prior_starts_at_the_norm_product(grids):
    out = XCosLayer(attention_prior=True)(*grids)
    prior = _numpy_norm_product(*grids)
    np.testing.assert_allclose(np.asarray(out["attention_map"]), prior / prior.sum(axis=(1, 2), keepdims=True), atol=1e-6)


def test_attention_prior_adds_to_the_learned_logits(grids):
    plain, with_prior = XCosLayer(), XCosLayer(attention_prior=True)
    plain(*grids)
    with_prior(*grids)
    rng = np.random.default_rng(6)
    for weight in plain.weights:  # learned logits far from zero, shared by both layers
        weight.assign(rng.uniform(0.5, 1.5, size=weight.shape).astype("float32"))
    with_prior.set_weights(plain.get_weights())
    learned = np.asarray(plain(*grids)["attention_map"])  # softmax of the learned logits alone
    expected = learned * _numpy_norm_product(*grids)  # softmax(logits + log prior)
    got = with_prior(*grids)
    np.testing.assert_allclose(np.asarray(got["attention_map"]), expected / expected.sum(axis=(1, 2), keepdims=True), atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["score"]), (numpy_cos_map(*grids) * np.asarray(got["attention_map"])).sum(axis=(1, 2)), atol=1e-5)
    swapped = with_prior(grids[1], grids[0])
    for key in ("score", "attention_map"):
        np.testing.assert_allclose(np.asarray(swapped[key]), np.asarray(got[key]), atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_attention_prior_start_scores_as_the_zero_logit_start(grids, training):
    """The learned logits start at 1 in every cell (BN offset 1, where PReLU passes gradients),
    not at 0 (where it passes none): the softmax ignores the constant, the scores do not move."""
    layer = XCosLayer(attention_prior=True)
    layer(*grids)
    logit_bn = layer._fuse.get_layer("logit_bn")
    assert np.asarray(logit_bn.beta).tolist() == [1.0]
    start = {key: np.asarray(value) for key, value in layer(*grids, training=training).items()}
    logit_bn.beta.assign(np.zeros(1, "float32"))  # the start before: every logit exactly 0
    zero = layer(*grids, training=training)
    np.testing.assert_allclose(start["score"], np.asarray(zero["score"]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(start["attention_map"], np.asarray(zero["attention_map"]), rtol=0, atol=1e-6)


def test_attention_prior_needs_learned_attention():
    with pytest.raises(ValueError, match="attention_prior"):
        XCosLayer(attention="uniform", attention_prior=True)


def test_xcos_layer_check_with_attention_prior(grids):
    layer = run_layer_check(
        XCosLayer,
        {"attention_prior": True},
        grids,
        {"score": (3,), "cos_map": (3, 7, 7), "attention_map": (3, 7, 7)},
    )
    assert layer.get_config()["attention_prior"] is True
