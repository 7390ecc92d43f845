"""One tiny exported model per test session, shared by test_export.py and test_runtime.py.

Exporting every format takes about a minute even for a tiny model, so it happens once per
process (`exported_model`), from a `.keras` file; it needs no shared data (int8 only with real faces).
"""
import types

import keras
import numpy as np
import pytest

from common_testing import SHARED_DIR, tiny_backbone
from xcos_tf import export
from xcos_tf import model as xcos_model

THRESHOLD, FAR = 0.25, 1e-3
# Max abs error to Keras on score and maps, per format. int8 measured on the tiny model below
# with 22 held-out glint_sample pairs: score 0.0024, cos_map 0.029, attention_map 0.005
# (attention up to 0.14); the bounds leave 3-4x headroom.
BOUNDS = {
    "saved_model": 1e-4,
    "tflite": 1e-4,
    "onnx": 1e-4,
    "tflite_fp16": 1e-2,
    "tflite_int8": {"score": 0.01, "cos_map": 0.1, "attention_map": 0.02},
}
# embed: (max abs error of the L2-normalised embedding, max error of the grid relative to its
# largest value). int8 measured: 0.008 and 0.056 (int8 activations step 1/128 of their range).
EMBED_BOUNDS = {
    "saved_model": (1e-5, 1e-5),
    "tflite": (1e-5, 1e-5),
    "onnx": (1e-5, 1e-5),
    "tflite_fp16": (1e-3, 1e-2),
    "tflite_int8": (0.03, 0.15),
}
_CACHE = {}


def tiny_backbone_7x7():
    """112x112 pixels -> 7x7x16: a 2x pooling before common_testing's H/8 tiny backbone (stride 16)."""
    image = keras.Input((112, 112, 3), name="image")
    pooled = keras.layers.AveragePooling2D(2, name="pool")(image)
    return keras.Model(image, tiny_backbone((56, 56, 3))(pooled), name="tiny7")


def tiny_trainer(seed=0):
    """A tiny trainer with trained-looking batch norms and PReLUs, so that attention is far
    from uniform (freshly initialised, every cell gets 1/49 and the map checks are trivial).
    Here attention spans about 0.004..0.08 per cell on real faces."""
    keras.utils.set_random_seed(seed)
    trainer = xcos_model.build_trainer(tiny_backbone_7x7(), num_classes=6)
    rng = np.random.default_rng(seed)
    for layer in trainer._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            size = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 2.0, size).astype("float32"))
            layer.beta.assign(rng.normal(0.0, 0.3, size).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 1.0, size).astype("float32"))
            if layer.name == "logit_bn":  # sharpens the attention logits
                layer.gamma.assign(np.full(size, 10.0, "float32"))
        if isinstance(layer, keras.layers.PReLU):
            layer.alpha.assign(np.full(layer.alpha.shape, 0.25, "float32"))
    return trainer


def generated_faces(count, size=112, seed=0):
    """Smooth random uint8 images [count, size, size, 3]: stand-ins for aligned faces, so the export
    round trip runs on a clean clone without the shared data."""
    import cv2

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (count, 14, 14, 3), dtype=np.uint8)
    return np.stack([cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC) for image in coarse])


def exported_model(tmp_path_factory):
    """The session's export of `tiny_trainer()`, with its held-out faces and verifier.

    With the shared folder: every format, int8 calibrated on real glint_sample faces. Without
    it: generated faces and every format but tflite_int8 (`require_format` skips those tests).
    """
    if "model" not in _CACHE:
        root = tmp_path_factory.mktemp("export")
        trainer = tiny_trainer()
        keras_path = root / "tiny.keras"
        trainer.save(keras_path)
        real_faces = SHARED_DIR / "data" / "glint_sample" / "images"
        if real_faces.is_dir():
            faces = export.load_faces(real_faces, limit=176)
        else:
            faces = generated_faces(176)
        is_test = np.arange(len(faces)) % 4 == 0
        formats = list(export.FORMATS) if real_faces.is_dir() else [f for f in export.FORMATS if f != "tflite_int8"]
        out_dir = root / "deploy"
        manifest = export.export_model(
            str(keras_path), str(out_dir), formats=formats, threshold=THRESHOLD, far=FAR,
            calibration_images=faces[~is_test],
        )
        _CACHE["model"] = types.SimpleNamespace(
            dir=out_dir,
            manifest=manifest,
            formats=formats,
            verifier=xcos_model.build_verifier(trainer),
            faces=faces[is_test],  # never seen by the calibration
        )
    return _CACHE["model"]


def require_format(exported, model_format):
    """Skips a test of a format the session's export does not hold (int8 needs real faces)."""
    if model_format not in exported.formats:
        pytest.skip(f"{model_format} is calibrated on real faces from the shared folder (absent on this machine)")


def keras_outputs(model, inputs):
    """A Keras model's outputs as numpy."""
    return {key: np.asarray(value) for key, value in model(inputs, training=False).items()}


def max_errors(outputs, reference):
    return {key: float(np.max(np.abs(outputs[key] - reference[key]))) for key in reference}


def assert_within(outputs, reference, bound, what):
    """Every output's max abs error to the reference is within `bound` (a float or per key)."""
    errors = max_errors(outputs, reference)
    for key, error in errors.items():
        limit = bound[key] if isinstance(bound, dict) else bound
        assert error <= limit, f"{what}: {key} differs by {error:.3g} > {limit:g} (all errors: {errors})"
