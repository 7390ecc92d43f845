"""Tests for xcos_tf.teacher: ONNX (shared teacher), SavedModel and TFLite with declared preprocessing."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from xcos_tf import teacher as teacher_lib


def _faces(count=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, 112, 112, 3), dtype=np.uint8)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def tiny_embedder(tmp_path_factory):
    """A tiny NHWC model as SavedModel and .tflite, with its Keras outputs for BGR, (x-100)/50 input."""
    keras.utils.set_random_seed(0)
    image = keras.Input((112, 112, 3), name="face")
    x = keras.layers.Conv2D(4, 5, strides=4)(image)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(image, keras.layers.Dense(8)(x))
    folder = tmp_path_factory.mktemp("teacher")
    saved_model = str(folder / "saved_model")
    model.export(saved_model, format="tf_saved_model", verbose=False)
    tflite = folder / "teacher.tflite"
    tflite.write_bytes(tf.lite.TFLiteConverter.from_saved_model(saved_model).convert())
    faces = _faces()
    expected = _unit(model.predict((faces[..., ::-1].astype(np.float32) - 100.0) / 50.0, verbose=0))
    return saved_model, str(tflite), faces, expected


@pytest.mark.parametrize("which", ["saved_model", "tflite"])
def test_saved_model_and_tflite_teachers(tiny_embedder, which):
    saved_model, tflite, faces, expected = tiny_embedder
    path = saved_model if which == "saved_model" else tflite
    teacher = teacher_lib.Teacher(path, color="bgr", mean=100.0, scale=1 / 50.0, layout="nhwc", batch_size=2)
    assert teacher.format == which
    embeddings = teacher.embed(faces)
    assert embeddings.shape == (3, 8) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, expected, atol=1e-4)
    np.testing.assert_allclose(teacher.embed(faces[0]), expected[:1], atol=1e-4)  # one face


def test_shared_onnx_teacher(shared_dir):
    teacher = teacher_lib.Teacher(shared_dir / "models" / "teacher_mobilefacenet.onnx")
    assert teacher.get_config() == {"name": "teacher_mobilefacenet.onnx", "format": "onnx", "color": "rgb",
                                     "mean": 127.5, "scale": 1 / 128, "layout": "nchw"}
    faces = _faces(5)
    embeddings = teacher.embed(faces)
    assert embeddings.shape == (5, 128)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    # Chunking does not change the numbers, nor does uint8 versus float input.
    small_batches = teacher_lib.Teacher(shared_dir / "models" / "teacher_mobilefacenet.onnx", batch_size=2)
    np.testing.assert_allclose(small_batches.embed(faces.astype(np.float32)), embeddings, atol=1e-5)


def test_teacher_errors(tmp_path, shared_dir):
    onnx_path = shared_dir / "models" / "teacher_mobilefacenet.onnx"
    with pytest.raises(FileNotFoundError, match="absent.onnx"):
        teacher_lib.Teacher(tmp_path / "absent.onnx")
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="Unknown teacher format"):
        teacher_lib.Teacher(tmp_path / "model.pt")
    with pytest.raises(ValueError, match="layout"):
        teacher_lib.Teacher(onnx_path, layout="chw")
    # The shared teacher is NCHW: declaring NHWC is caught from its input shape.
    with pytest.raises(ValueError, match="is `layout` right"):
        teacher_lib.Teacher(onnx_path, layout="nhwc")
    teacher = teacher_lib.Teacher(onnx_path)
    with pytest.raises(ValueError, match=r"\[N, 112, 112, 3\]"):
        teacher.embed(np.zeros((2, 96, 96, 3), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        teacher.embed(np.full((1, 112, 112, 3), np.nan, np.float32))
