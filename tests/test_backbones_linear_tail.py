"""read_linear_tail: the embedding of an ONNX face model as the sum of per-cell partial embeddings."""
import cv2
import numpy as np
import onnx
import pytest

from tests.tiny_onnx_tails import EMBEDDING, MAP, TAILS, run_onnx, tiny_face_model
from xcos_tf import backbones

TEACHER = "models/teacher_mobilefacenet.onnx"
TEACHER_MAP = "/conv2/conv2.2/Clip_output_0"


def _pixels(seed, count=4, size=32):
    return np.random.default_rng(seed).uniform(0, 255, (count, size, size, 3)).astype("float32")


@pytest.mark.parametrize("tail_kind", TAILS)
def test_partial_embeddings_sum_to_the_onnx_embedding(tail_kind):
    model = tiny_face_model(tail_kind)
    # For the IResNet form, end at the last ReLU so that the BN2d is part of the tail.
    feature_map = "relu3" if tail_kind.startswith("fc") else None
    tail = backbones.read_linear_tail(model, feature_map=feature_map, input_shape=(32, 32, 3))
    assert tail.feature_map == MAP and tail.grid_shape == (4, 4)
    assert tail.cell_weights.shape == (16, 16, EMBEDDING) and tail.cell_weights.dtype == np.float32
    embedding, feature_map = run_onnx(model, _pixels(1), ("embedding", MAP))
    nhwc = feature_map.transpose(0, 2, 3, 1)  # cell index h * W + w
    np.testing.assert_allclose(tail.embedding(nhwc), embedding, atol=1e-5)
    assert np.abs(embedding).std() > 0.1  # a real signal


def test_cells_are_in_row_major_nhwc_order():
    tail = backbones.read_linear_tail(tiny_face_model("gdconv"), input_shape=(32, 32, 3))
    feature_map = np.zeros((1, 4, 4, 16), "float32")
    feature_map[0, 1, 2, :] = 1.0  # only the cell at h=1, w=2
    partial = tail.partial_embeddings(feature_map)[0]
    assert np.flatnonzero(np.abs(partial).sum(axis=1)).tolist() == [1 * 4 + 2]
    np.testing.assert_allclose(partial[6], tail.cell_weights[6].sum(axis=0), atol=1e-6)


def test_a_named_feature_map_takes_the_bn2d_into_the_tail(tmp_path):
    model = tiny_face_model("fc_bn")
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    # By default from_onnx cuts after the BN2d and dropout (the last 4x4 tensor); ending at
    # the ReLU node instead puts the BN2d in the tail.
    default = backbones.read_linear_tail(path, input_shape=(32, 32, 3))
    named = backbones.read_linear_tail(path, feature_map="relu3", input_shape=(32, 32, 3))
    assert default.feature_map == "dropped" and named.feature_map == MAP
    embedding, before_bn, after_bn = run_onnx(model, _pixels(2), ("embedding", MAP, "dropped"))
    np.testing.assert_allclose(named.embedding(before_bn.transpose(0, 2, 3, 1)), embedding, atol=1e-5)
    np.testing.assert_allclose(default.embedding(after_bn.transpose(0, 2, 3, 1)), embedding, atol=1e-5)


@pytest.mark.parametrize("op", ["Relu", "PRelu", "Sigmoid"])
def test_a_nonlinear_tail_is_refused_by_op_and_node(op):
    model = tiny_face_model("gdconv", nonlinear=op)
    with pytest.raises(ValueError, match=f"not linear: {op} node 'gdconv/act'"):
        backbones.read_linear_tail(model, input_shape=(32, 32, 3))


def test_a_product_of_map_tensors_is_refused():
    model = tiny_face_model("gdconv")
    squared = onnx.helper.make_node("Mul", ["gd", "gd"], ["gd_sq"], name="square")
    conv = next(n for n in model.graph.node if n.name == "linear/conv")
    conv.input[0] = "gd_sq"
    model.graph.node.insert(list(model.graph.node).index(conv), squared)
    with pytest.raises(ValueError, match="not linear: Mul node 'square'"):
        backbones.read_linear_tail(model, input_shape=(32, 32, 3))


def test_an_unsupported_tail_op_and_bad_arguments_are_named(tmp_path):
    model = tiny_face_model("gdconv", nonlinear="Softsign")
    with pytest.raises(ValueError, match="unsupported op: Softsign node 'gdconv/act'"):
        backbones.read_linear_tail(model, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="path or an onnx.ModelProto"):
        backbones.read_linear_tail(b"bytes")
    with pytest.raises(FileNotFoundError):
        backbones.read_linear_tail(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="feature_map"):
        backbones.read_linear_tail(tiny_face_model("gdconv"), feature_map="no_such_node", input_shape=(32, 32, 3))


# === The shared teacher: Clip (7x7x512) -> GDConv 7x7 depthwise -> 1x1 conv 512 -> 128 ===


def _aligned_faces(shared_dir, count=4):
    people = sorted(p for p in (shared_dir / "data/glint_sample/images").iterdir() if p.is_dir())
    paths = [sorted(person.glob("*.jpg"))[0] for person in people[:count]]
    return np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]).astype("float32")


def test_teacher_partial_embeddings_reproduce_onnxruntime(shared_dir):
    import onnxruntime

    path = shared_dir / TEACHER
    tail = backbones.read_linear_tail(path)
    assert tail.feature_map == TEACHER_MAP and tail.grid_shape == (7, 7)
    assert tail.cell_weights.shape == (49, 512, 128)
    model = onnx.load(str(path))
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(TEACHER_MAP))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    faces = ((_aligned_faces(shared_dir) - 127.5) / 128).transpose(0, 3, 1, 2)
    embedding, feature_map = session.run(["output0", TEACHER_MAP], {"input0": faces})
    got = tail.embedding(feature_map.transpose(0, 2, 3, 1))
    assert np.abs(got - embedding).max() <= 1e-4 * np.abs(embedding).max()
