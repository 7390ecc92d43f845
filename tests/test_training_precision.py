"""--jit_compile and --mixed_precision of the training step (issue 17)."""
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import export_testing
from xcos_tf import model as xcos_model
from xcos_tf.training import config as train_config, factory, loop


def _batch(pairs=2, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image_a": rng.uniform(0, 255, (pairs, 112, 112, 3)).astype("float32"),
        "image_b": rng.uniform(0, 255, (pairs, 112, 112, 3)).astype("float32"),
        "label_a": rng.integers(0, 6, pairs).astype("int32"),
        "label_b": rng.integers(0, 6, pairs).astype("int32"),
        "teacher_cos": rng.uniform(-1, 1, pairs).astype("float32"),
    }


def _losses(precision, jit_compile, steps=3):
    """Loss terms of `steps` steps of a tiny trainer (same initial weights) under the settings."""
    config = train_config.TrainConfig(model_dir="unused", data="synthetic", num_classes=6, mixed_precision=precision,
                                      jit_compile=jit_compile)
    keras.mixed_precision.set_global_policy("float32" if precision == "none" else precision)
    try:
        keras.utils.set_random_seed(0)
        trainer = xcos_model.build_trainer(export_testing.tiny_backbone_7x7(), num_classes=6)
        optimizer = factory.make_optimizer(config, "sgd", 0.01)
        trainer.compile(optimizer=optimizer)
        for group_optimizer, variables in trainer.optimizer_groups():
            group_optimizer.build(variables)
        strategy = tf.distribute.get_strategy()
        step = loop.make_train_step(strategy, trainer, jit_compile=config.jit_compile)
        iterator = iter(tf.data.Dataset.from_tensors(_batch()).repeat())
        terms = [step(iterator) for _ in range(steps)]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return optimizer, terms


def test_xla_step_gives_the_same_losses():
    _, plain = _losses("none", jit_compile=False)
    _, compiled = _losses("none", jit_compile=True)
    for expected, got in zip(plain, compiled):
        for name in ("loss", "ce_loss", "xcos_loss"):
            np.testing.assert_allclose(float(got[name]), float(expected[name]), rtol=1e-4, atol=1e-5)
    assert float(plain[-1]["loss"]) != float(plain[0]["loss"])  # the steps did train


def test_mixed_bfloat16_keeps_losses_in_float32_without_loss_scaling():
    optimizer, mixed = _losses("mixed_bfloat16", jit_compile=False)
    _, plain = _losses("none", jit_compile=False, steps=1)
    assert not isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    assert all(value.dtype == tf.float32 and np.isfinite(float(value)) for terms in mixed for value in terms.values())
    # bfloat16 has 8 bits of mantissa: the first loss agrees with float32's to about 1 %.
    np.testing.assert_allclose(float(mixed[0]["loss"]), float(plain[0]["loss"]), rtol=0.03)


def test_mixed_float16_scales_the_loss():
    config = train_config.TrainConfig(model_dir="unused", mixed_precision="mixed_float16")
    assert isinstance(factory.make_optimizer(config, "sgd", 0.01), keras.optimizers.LossScaleOptimizer)


@pytest.mark.parametrize("saved, expected", [(True, "mixed_float16"), (False, "none")])
def test_params_of_runs_before_the_precision_enum_still_load(tmp_path, saved, expected):
    params = json.loads(train_config.TrainConfig(model_dir=str(tmp_path)).to_json())
    params["mixed_precision"] = saved
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert train_config.TrainConfig.from_json(str(tmp_path / "params.json")).mixed_precision == expected
