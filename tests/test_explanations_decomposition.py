"""The exact decomposition: score == sum(contribution_map) + bias, and score is the model's own cosine."""
import cv2
import keras
import numpy as np
import onnx
import pytest

from tests.tiny_onnx_tails import run_onnx, tiny_face_model
from xcos_tf import backbones
from xcos_tf.explanations import decomposition

TEACHER = "models/teacher_mobilefacenet.onnx"


def _cosine(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _tiny(tmp_path, tail_kind):
    model = tiny_face_model(tail_kind)
    path = tmp_path / f"{tail_kind}.onnx"
    onnx.save(model, str(path))
    # from_onnx's default cut refuses a graph whose flatten shape is computed by Shape ops
    # (PyTorch's x.view(x.size(0), -1)): name the map there.
    cut = {"feature_map": "dropout"} if tail_kind == "fc_view" else {}
    body = backbones.from_onnx(path, input_shape=(32, 32, 3), **cut)
    tail = backbones.read_linear_tail(path, input_shape=(32, 32, 3), **cut)
    return model, decomposition.decomposition_model(body, tail)


def _run(explainer, pixels_a, pixels_b):
    return {k: np.asarray(v) for k, v in explainer({"image_a": pixels_a, "image_b": pixels_b}).items()}


@pytest.mark.parametrize("tail_kind", ["gdconv", "gdconv_bn", "fc_bn", "fc_view"])
def test_contributions_sum_to_the_onnx_cosine(tmp_path, tail_kind):
    model, explainer = _tiny(tmp_path, tail_kind)
    rng = np.random.default_rng(0)
    pixels_a, pixels_b = (rng.uniform(0, 255, (6, 32, 32, 3)).astype("float32") for _ in range(2))
    pixels_b[:2] = pixels_a[:2]  # identical faces: score 1
    out = _run(explainer, pixels_a, pixels_b)
    assert out["contribution_map"].shape == (6, 4, 4) and out["bias"].shape == (6,)
    np.testing.assert_allclose(out["contribution_map"].sum(axis=(1, 2)) + out["bias"], out["score"], atol=1e-5)
    (embedding_a,), (embedding_b,) = run_onnx(model, pixels_a), run_onnx(model, pixels_b)
    np.testing.assert_allclose(out["score"], _cosine(embedding_a, embedding_b), atol=1e-5)
    np.testing.assert_allclose(out["score"][:2], 1.0, atol=1e-5)
    assert out["contribution_map"].std() > 1e-3  # cells really differ


def test_contribution_map_is_symmetric_and_matches_numpy(tmp_path):
    model, explainer = _tiny(tmp_path, "gdconv")
    rng = np.random.default_rng(1)
    pixels_a, pixels_b = (rng.uniform(0, 255, (3, 32, 32, 3)).astype("float32") for _ in range(2))
    ab, ba = _run(explainer, pixels_a, pixels_b), _run(explainer, pixels_b, pixels_a)
    for key in ab:
        np.testing.assert_allclose(ab[key], ba[key], atol=1e-6)
    # NumPy: the partial embeddings of the maps onnxruntime computes, the formula in the docstring.
    tail = backbones.read_linear_tail(model, input_shape=(32, 32, 3))
    (map_a,), (map_b,) = run_onnx(model, pixels_a, ("features",)), run_onnx(model, pixels_b, ("features",))
    partial_a, partial_b = (tail.partial_embeddings(m.transpose(0, 2, 3, 1)) for m in (map_a, map_b))
    e_a, e_b = partial_a.sum(1) + tail.bias, partial_b.sum(1) + tail.bias
    norms = np.linalg.norm(e_a, axis=-1) * np.linalg.norm(e_b, axis=-1)
    expected = ((partial_a * e_b[:, None]).sum(-1) + (e_a[:, None] * partial_b).sum(-1)) / 2 / norms[:, None]
    np.testing.assert_allclose(ab["contribution_map"].reshape(3, -1), expected, atol=1e-5)
    np.testing.assert_allclose(ab["bias"], (tail.bias * (e_a + e_b)).sum(-1) / 2 / norms, atol=1e-5)


def test_saves_and_reloads(tmp_path):
    _, explainer = _tiny(tmp_path, "fc_bn")
    pixels = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    explainer.save(tmp_path / "decomposition.keras")
    reloaded = keras.saving.load_model(tmp_path / "decomposition.keras")
    for key, value in _run(explainer, pixels, pixels[::-1]).items():
        np.testing.assert_array_equal(_run(reloaded, pixels, pixels[::-1])[key], value)


def test_a_body_cut_elsewhere_is_refused(tmp_path):
    model = tiny_face_model("gdconv")
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    body = backbones.from_onnx(path, feature_map="relu2", input_shape=(32, 32, 3))  # the 8x8 stage
    with pytest.raises(ValueError, match="does not fit the tail"):
        decomposition.decomposition_model(body, backbones.read_linear_tail(path, input_shape=(32, 32, 3)))


def test_teacher_decomposition_on_real_faces(shared_dir):
    import onnxruntime

    path = shared_dir / TEACHER
    explainer = decomposition.decomposition_model(backbones.from_onnx(path), backbones.read_linear_tail(path))
    people = sorted(p for p in (shared_dir / "data/glint_sample/images").iterdir() if p.is_dir())[:3]
    paths = [p for person in people for p in sorted(person.glob("*.jpg"))[:2]]  # two photos of each
    faces = np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]).astype("float32")
    faces_a, faces_b = faces, np.roll(faces, 1, axis=0)  # same-person and different-person pairs
    out = _run(explainer, faces_a, faces_b)
    assert out["contribution_map"].shape == (6, 7, 7)
    np.testing.assert_allclose(out["contribution_map"].sum(axis=(1, 2)) + out["bias"], out["score"], atol=1e-4)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    embeddings = session.run(["output0"], {"input0": ((faces - 127.5) / 128).transpose(0, 3, 1, 2)})[0]
    np.testing.assert_allclose(out["score"], _cosine(embeddings, np.roll(embeddings, 1, axis=0)), atol=1e-4)
