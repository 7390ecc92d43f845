"""Margin heads against the closed-form formulas, at the edges of the angle range."""
import math

import keras
import numpy as np
import pytest

from tests.layer_checks import run_layer_check
from xcos_tf.layers import ArcFace, CosFace, MarginSoftmax


def head_with_centres(head_cls, centres, **kwargs):
    head = head_cls(centres.shape[1], **kwargs)
    head.build((None, centres.shape[0]))
    head.centres.assign(centres)
    return head


def float32_angle(theta):
    """The angle the head actually sees: float32 cannot hold cos(theta) for theta < ~3e-4."""
    return math.acos(float(np.float32(math.cos(theta))))


def embedding_at_angle(theta):
    """A unit 2-d embedding at angle theta from class 0's centre (1, 0)."""
    return np.array([[math.cos(theta), math.sin(theta)]], dtype="float32")


CENTRES = np.array([[1.0, 0.0], [0.0, 1.0]], dtype="float32")  # class 0 along x, class 1 along y


@pytest.mark.parametrize("theta", [1e-4, 0.3, 1.5, math.pi - 0.3, math.pi - 1e-4])
def test_cosface_closed_form(theta):
    head = head_with_centres(CosFace, CENTRES, scale=30.0, margin=0.35)
    logits = np.asarray(head(embedding_at_angle(theta), np.array([0]), training=True))
    np.testing.assert_allclose(logits[0, 0], 30.0 * (math.cos(theta) - 0.35), atol=1e-3)
    np.testing.assert_allclose(logits[0, 1], 30.0 * math.cos(math.pi / 2 - theta), atol=1e-3)


@pytest.mark.parametrize("theta", [1e-4, 0.3, 1.5, 2.5])
def test_arcface_closed_form(theta):
    head = head_with_centres(ArcFace, CENTRES, scale=64.0, margin=0.5)
    logits = np.asarray(head(embedding_at_angle(theta), np.array([0]), training=True))
    np.testing.assert_allclose(logits[0, 0], 64.0 * math.cos(float32_angle(theta) + 0.5), atol=2e-3)


@pytest.mark.parametrize("theta", [math.pi - 0.3, math.pi - 1e-4])
def test_arcface_falls_back_past_pi(theta):
    """theta + m > pi: the target logit keeps falling with theta instead of rising again."""
    head = head_with_centres(ArcFace, CENTRES, scale=64.0, margin=0.5)
    logits = np.asarray(head(embedding_at_angle(theta), np.array([0]), training=True))
    expected = math.cos(theta) - 0.5 * math.sin(math.pi - 0.5)
    np.testing.assert_allclose(logits[0, 0], 64.0 * expected, atol=2e-3)
    assert logits[0, 0] < 64.0 * math.cos(math.pi)  # below the plain cosine's minimum


def test_combined_margin_matches_formula():
    head = head_with_centres(MarginSoftmax, CENTRES, scale=10.0, m1=1.2, m2=0.2, m3=0.1)
    theta = 0.7
    logits = np.asarray(head(embedding_at_angle(theta), np.array([0]), training=True))
    np.testing.assert_allclose(logits[0, 0], 10.0 * (math.cos(1.2 * theta + 0.2) - 0.1), atol=1e-3)


def test_margin_only_on_true_class_and_only_in_training():
    head = head_with_centres(CosFace, CENTRES)
    x = embedding_at_angle(0.4)
    plain = np.asarray(head(x))
    np.testing.assert_allclose(plain, np.asarray(head(x, np.array([1]), training=False)))
    margined = np.asarray(head(x, np.array([1]), training=True))
    np.testing.assert_allclose(margined[:, 0], plain[:, 0], atol=1e-5)
    np.testing.assert_allclose(margined[:, 1], plain[:, 1] - 30.0 * 0.35, atol=1e-4)


@pytest.mark.parametrize("head_cls", [CosFace, ArcFace])
def test_gradients_finite_at_theta_zero_and_pi(head_cls):
    import tensorflow as tf

    head = head_with_centres(head_cls, CENTRES)
    for x in (np.array([[1.0, 0.0]], "float32"), np.array([[-1.0, 0.0]], "float32")):
        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = head(x, np.array([0]), training=True)
            loss = keras.losses.sparse_categorical_crossentropy(np.array([0]), logits, from_logits=True)
        grad = tape.gradient(loss, [x, head.centres])
        assert all(np.isfinite(g.numpy()).all() for g in grad)


@pytest.mark.parametrize("head_cls", [CosFace, ArcFace])
def test_no_nan_under_mixed_float16(head_cls):
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(8, 64)).astype("float16") * 100  # large values overflow if squared in fp16
    head = head_cls(10, dtype="mixed_float16")
    logits = np.asarray(head(embedding, rng.integers(0, 10, 8), training=True))
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("head_cls, kwargs", [(CosFace, {"margin": 0.35}), (ArcFace, {"margin": 0.5})])
def test_margin_head_layer_check(head_cls, kwargs):
    rng = np.random.default_rng(1)
    run_layer_check(
        head_cls,
        {"num_classes": 5, **kwargs},
        (rng.normal(size=(4, 16)).astype("float32"), rng.integers(0, 5, 4)),
        (4, 5),
    )


@pytest.mark.parametrize(
    "kwargs", [{"num_classes": 0}, {"num_classes": 3, "m2": 2.0}, {"num_classes": 3, "scale": -1.0}]
)
def test_bad_margin_arguments_are_named(kwargs):
    with pytest.raises(ValueError):
        MarginSoftmax(**kwargs)
