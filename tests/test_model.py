"""XCosTrainer trains every part; the verifier's three models agree and survive .keras files."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from training_testing import mean_loss, train_on_batch
from xcos_tf import model

IMAGE_SHAPE = (32, 32, 3)


def random_batch(rng, size=8, num_classes=4):
    return {
        "image_a": rng.uniform(0, 255, (size,) + IMAGE_SHAPE).astype("float32"),
        "image_b": rng.uniform(0, 255, (size,) + IMAGE_SHAPE).astype("float32"),
        "label_a": rng.integers(0, num_classes, size).astype("int32"),
        "label_b": rng.integers(0, num_classes, size).astype("int32"),
        "teacher_cos": rng.uniform(-0.2, 0.9, size).astype("float32"),
    }


@pytest.fixture
def trainer(make_tiny_backbone):
    keras.utils.set_random_seed(0)
    return model.build_trainer(make_tiny_backbone(IMAGE_SHAPE), num_classes=4, image_shape=IMAGE_SHAPE, grid_channels=8)


def test_outputs_have_the_documented_shapes(trainer):
    batch = random_batch(np.random.default_rng(0))
    out = trainer(batch, training=False)
    assert tuple(out["score"].shape) == (8,)
    assert tuple(out["cos_map"].shape) == (8, 4, 4)
    assert tuple(out["attention_map"].shape) == (8, 4, 4)
    assert tuple(out["logits"].shape) == (16, 4)
    assert tuple(out["embedding"].shape) == (16, 4 * 4 * 8)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out["embedding"]), axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("two_optimizers", [False, True])
def test_training_lowers_the_loss_and_moves_every_part(trainer, two_optimizers):
    rng = np.random.default_rng(1)
    batch = random_batch(rng)
    trainer.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        attention_optimizer=keras.optimizers.Adam(1e-2) if two_optimizers else None,
    )
    parts = {
        "backbone": trainer.backbone,
        "grid_head": trainer.grid_head,
        "margin_head": trainer.margin_head,
        "attention": trainer.xcos,
    }
    before = {name: [w.numpy().copy() for w in part.trainable_weights] for name, part in parts.items()}
    first = mean_loss(trainer, batch)
    train_on_batch(trainer, batch, steps=15)
    last = mean_loss(trainer, batch)
    assert last < 0.8 * first
    for name, part in parts.items():
        moved = [not np.allclose(b, w.numpy()) for b, w in zip(before[name], part.trainable_weights)]
        assert any(moved) and sum(moved) >= 0.5 * len(moved), f"{name}: {sum(moved)}/{len(moved)} weights moved"
    if two_optimizers:
        assert trainer.attention_optimizer.iterations.numpy() == 15


def test_loss_terms_follow_the_formula_and_skip_unlabelled_faces(trainer):
    rng = np.random.default_rng(2)
    batch = random_batch(rng)
    batch["label_b"][:] = model.UNLABELLED
    out = trainer(batch, training=True)
    terms = {k: float(v) for k, v in trainer.compute_loss_terms(batch, out).items()}
    logits = np.asarray(out["logits"], dtype="float64")[:8]  # faces a: the labelled ones
    log_softmax = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    expected_ce = -log_softmax[np.arange(8), batch["label_a"]].mean()
    expected_mse = np.mean((np.asarray(out["score"]) - batch["teacher_cos"]) ** 2)
    assert terms["ce_loss"] == pytest.approx(expected_ce, rel=1e-4)
    assert terms["xcos_loss"] == pytest.approx(expected_mse, rel=1e-4)
    assert terms["loss"] == pytest.approx(expected_ce + expected_mse, rel=1e-4)


def test_without_ce_the_margin_head_is_skipped_and_files_still_round_trip(make_tiny_backbone, tmp_path):
    keras.utils.set_random_seed(0)
    trainer = model.build_trainer(
        make_tiny_backbone(IMAGE_SHAPE), num_classes=1000, image_shape=IMAGE_SHAPE, grid_channels=8, ce_weight=0.0
    )
    batch = random_batch(np.random.default_rng(4))
    out = trainer(batch, training=False)
    assert "logits" not in out and trainer.margin_head is None
    terms = trainer.compute_loss_terms(batch, out)
    assert float(terms["ce_loss"]) == 0.0
    np.testing.assert_allclose(float(terms["loss"]), np.mean((np.asarray(out["score"]) - batch["teacher_cos"]) ** 2), rtol=1e-5)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-2))
    losses = train_on_batch(trainer, batch, steps=10)
    assert losses[-1] < 0.5 * losses[0]
    path = str(tmp_path / "no_ce.keras")
    trainer.save(path)
    clone = keras.saving.load_model(path)
    np.testing.assert_allclose(clone(batch)["score"], trainer(batch)["score"], atol=1e-6)


def test_verifier_models_agree(trainer):
    rng = np.random.default_rng(3)
    batch = random_batch(rng, size=3)
    verifier = model.build_verifier(trainer)
    verified = verifier.verify({"image_a": batch["image_a"], "image_b": batch["image_b"]})
    embedded_a = verifier.embed({"image": batch["image_a"]})
    embedded_b = verifier.embed({"image": batch["image_b"]})
    compared = verifier.compare({"grid_a": embedded_a["grid"], "grid_b": embedded_b["grid"]})
    trained = trainer(batch, training=False)
    for key in ("score", "cos_map", "attention_map"):
        np.testing.assert_allclose(np.asarray(verified[key]), np.asarray(compared[key]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(verified[key]), np.asarray(trained[key]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(embedded_a["embedding"]), np.asarray(trained["embedding"])[:3], atol=1e-5)
    assert sorted(verifier.verify.output_names) == ["attention_map", "cos_map", "score"]


def test_keras_file_round_trip_gives_identical_outputs(trainer, tmp_path):
    batch = random_batch(np.random.default_rng(4), size=2)
    trainer.compile(optimizer=keras.optimizers.SGD(0.01), attention_optimizer=keras.optimizers.Adam(1e-3))
    train_on_batch(trainer, batch, steps=1)  # move BN statistics off their defaults
    path = tmp_path / "trainer.keras"
    trainer.save(path)
    reloaded = keras.saving.load_model(path)
    assert isinstance(reloaded, model.XCosTrainer)
    # Both optimizers come back as compiled, so a reloaded trainer can go on training.
    assert isinstance(reloaded.optimizer, keras.optimizers.SGD)
    assert isinstance(reloaded.attention_optimizer, keras.optimizers.Adam)
    expected, got = trainer(batch), reloaded(batch)
    for key in ("score", "cos_map", "attention_map", "logits", "embedding"):
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(expected[key]))
    from_file = model.build_verifier(str(path)).verify({"image_a": batch["image_a"], "image_b": batch["image_b"]})
    # The verifier runs the backbone on each face batch alone (the trainer on both at once): equal to float rounding.
    np.testing.assert_allclose(np.asarray(from_file["score"]), np.asarray(expected["score"]), rtol=0, atol=1e-6)


def test_arcface_and_fixed_attention_configs_round_trip(make_tiny_backbone):
    trainer = model.build_trainer(
        make_tiny_backbone(IMAGE_SHAPE), 3, image_shape=IMAGE_SHAPE, margin="arcface",
        margin_scale=32.0, margin_value=0.4, attention="fixed", fixed_weights=np.ones((4, 4)).tolist(),
    )
    clone = model.XCosTrainer.from_config(trainer.get_config())
    assert clone.margin_head.scale == 32.0 and clone.margin_head.margin == 0.4
    assert clone.xcos.attention == "fixed"


@pytest.mark.parametrize(
    "kwargs, message",
    [({"margin": "sphereface"}, "margin"), ({"ce_weight": 0.0, "xcos_weight": 0.0}, "weights")],
)
def test_bad_trainer_arguments_are_named(make_tiny_backbone, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.XCosTrainer(make_tiny_backbone(IMAGE_SHAPE), 3, **kwargs)


def test_build_verifier_refuses_other_things(tmp_path):
    with pytest.raises(ValueError, match="keras"):
        model.build_verifier(str(tmp_path / "missing.keras"))
    with pytest.raises(ValueError, match="XCosTrainer"):
        model.build_verifier(keras.Sequential([keras.layers.Dense(1)]))


def test_real_backbone_trains_one_step():
    """MobileFaceNet at 112x112 through the full trainer: shapes and a finite step."""
    from xcos_tf import backbones

    trainer = model.build_trainer(backbones.get("mobilefacenet"), num_classes=10)
    trainer.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), attention_optimizer=keras.optimizers.Adam(1e-3))
    rng = np.random.default_rng(5)
    batch = {
        "image_a": rng.uniform(0, 255, (2, 112, 112, 3)).astype("float32"),
        "image_b": rng.uniform(0, 255, (2, 112, 112, 3)).astype("float32"),
        "label_a": np.array([0, 1], "int32"), "label_b": np.array([0, 2], "int32"),
        "teacher_cos": np.array([0.7, 0.0], "float32"),
    }
    (loss,) = train_on_batch(trainer, batch, steps=1)
    assert np.isfinite(loss)
    out = model.build_verifier(trainer).verify({"image_a": batch["image_a"], "image_b": batch["image_b"]})
    assert tuple(out["cos_map"].shape) == (2, 7, 7)
    assert tf.reduce_all(tf.abs(out["score"]) <= 1.0)  # a weighted mean of cosines, clipped against float32 rounding
