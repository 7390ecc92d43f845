"""from_onnx: ONNX bodies import with the outputs onnxruntime (or the Keras original) gives."""
import importlib
import pathlib

import cv2
import keras
import numpy as np
import onnx
import onnxruntime
import pytest
import tensorflow as tf
import tf2onnx
from onnx import TensorProto, helper, numpy_helper

from xcos_tf import backbones

# The module, not the function of the same name that xcos_tf.backbones exports.
iresnet = importlib.import_module("xcos_tf.backbones.iresnet")

TEACHER = "models/teacher_mobilefacenet.onnx"
TEACHER_FEATURE_MAP = "/conv2/conv2.2/Clip_output_0"  # the Clip after the last 1x1 conv to 512
TOLERANCE = 1e-4


def _onnxruntime_tensor(onnx_model, tensor_name, feed):
    """Any tensor of the graph as seen by onnxruntime, by exposing it as an extra output."""
    onnx_model = onnx.ModelProto.FromString(onnx_model.SerializeToString())
    onnx_model.graph.output.append(helper.make_empty_tensor_value_info(tensor_name))
    session = onnxruntime.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([tensor_name], feed)[0]


def _nchw(images, mean=127.5, scale=1 / 128):
    return ((images - mean) * scale).transpose(0, 3, 1, 2).astype("float32")


def _max_difference(backbone, onnx_model, tensor_name, images, input_name):
    expected = _onnxruntime_tensor(onnx_model, tensor_name, {input_name: _nchw(images)})
    return float(np.abs(backbone.predict(images, verbose=0) - expected.transpose(0, 2, 3, 1)).max())


# === The shared teacher (MobileFaceNet, a PyTorch NCHW export) ===


@pytest.fixture(scope="module")
def teacher(shared_dir):
    path = shared_dir / TEACHER
    return backbones.from_onnx(path), onnx.load(str(path))


def _aligned_faces(shared_dir, count=4):
    """One already aligned 112x112 face for each of the first `count` people of glint_sample."""
    people = sorted(p for p in (shared_dir / "data/glint_sample/images").iterdir() if p.is_dir())
    paths = [sorted(person.glob("*.jpg"))[0] for person in people[:count]]
    return np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]).astype("float32")


def test_teacher_ends_at_the_7x7x512_clip_before_gdconv(teacher):
    backbone, _ = teacher
    assert backbone.input.shape == (None, 112, 112, 3)
    assert backbone.output.shape == (None, 7, 7, 512)
    assert backbone.layers[-1].name == "conv2_conv2_2_Clip"


def test_teacher_matches_onnxruntime_on_real_faces(teacher, shared_dir):
    backbone, onnx_model = teacher
    faces = _aligned_faces(shared_dir)
    assert faces.shape == (4, 112, 112, 3)
    assert _max_difference(backbone, onnx_model, TEACHER_FEATURE_MAP, faces, "input0") < TOLERANCE


def test_teacher_matches_onnxruntime_on_random_pixels(teacher):
    backbone, onnx_model = teacher
    pixels = np.random.default_rng(1).uniform(0, 255, (3, 112, 112, 3)).astype("float32")
    assert _max_difference(backbone, onnx_model, TEACHER_FEATURE_MAP, pixels, "input0") < TOLERANCE


def test_teacher_named_feature_map(shared_dir):
    # Ending earlier, at the 14x14 stage, by node name.
    backbone = backbones.from_onnx(shared_dir / TEACHER, feature_map="/features/features.6/Add")
    assert backbone.output.shape == (None, 14, 14, 128)


# === The project's own ir50, exported by tf2onnx (NHWC graph with Transposes) ===


def _randomize(model, seed=0):
    """Non-trivial BN statistics and PReLU slopes, so that both paths are really compared."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.gamma.shape
            layer.set_weights(
                [rng.uniform(0.2, 0.6, shape), rng.normal(0, 0.1, shape), rng.normal(0, 0.1, shape), rng.uniform(0.5, 1.5, shape)]
            )
        elif isinstance(layer, keras.layers.PReLU):
            layer.set_weights([rng.uniform(0.05, 0.4, layer.alpha.shape)])
    return model


def _export(model, directory, **tf2onnx_options):
    path = pathlib.Path(directory) / f"{model.name}.onnx"
    signature = (tf.TensorSpec((None, *model.input.shape[1:]), tf.float32, name="image"),)
    tf2onnx.convert.from_keras(model, input_signature=signature, opset=17, output_path=str(path), **tf2onnx_options)
    return path


def _check_tf2onnx_import(model, path):
    # The tf2onnx graph scales the pixels itself (the Keras Rescaling layer), so pass them as is.
    input_shape = tuple(model.input.shape[1:])
    imported = backbones.from_onnx(path, input_shape=input_shape, pixel_mean=0.0, pixel_scale=1.0)
    assert imported.output.shape == model.output.shape
    # tf2onnx writes PReLU as Relu(x) + Relu(-x) * -alpha; the import makes it one layer again.
    assert _count_layers(imported, keras.layers.PReLU) == _count_layers(model, keras.layers.PReLU)
    pixels = np.random.default_rng(2).uniform(0, 255, (2, *input_shape)).astype("float32")
    expected = model.predict(pixels, verbose=0)
    difference = np.abs(imported.predict(pixels, verbose=0) - expected).max()
    assert np.abs(expected).std() > 0.05  # a real signal, not a collapsed one
    assert difference < TOLERANCE, difference
    return difference


def _count_layers(model, layer_type):
    return sum(isinstance(layer, layer_type) for layer in model.layers)


@pytest.fixture
def small_iresnet(monkeypatch):
    """The ir50 / ir_se50 code path (PReLU, BN, both shortcuts, SE) at 1-2 units per stage."""
    monkeypatch.setattr(iresnet, "STAGE_UNITS", {50: (1, 1, 2, 1)})
    monkeypatch.setattr(iresnet, "STAGE_CHANNELS", (16, 32, 32, 64))

    def build(use_se):
        return _randomize(iresnet.iresnet(50, use_se, input_shape=(32, 32, 3), name="small_ir_se" if use_se else "small_ir"))

    return build


@pytest.mark.parametrize("use_se", [False, True], ids=["ir", "ir_se"])
def test_small_iresnet_tf2onnx(tmp_path, small_iresnet, use_se):
    model = small_iresnet(use_se)
    _check_tf2onnx_import(model, _export(model, tmp_path))


def test_small_iresnet_tf2onnx_unoptimized_graph(tmp_path, small_iresnet):
    # Without tf2onnx's optimizers every conv is bracketed by Transposes and BN is NHWC Mul/Add.
    model = small_iresnet(False)
    _check_tf2onnx_import(model, _export(model, tmp_path, optimizers={}))


@pytest.mark.slow
def test_ir50_tf2onnx(tmp_path):
    # The real 30 M parameter ir50; tf2onnx alone takes about a minute here.
    model = _randomize(backbones.get("ir50"))
    _check_tf2onnx_import(model, _export(model, tmp_path))


# === Hand-made graphs: every supported op against onnxruntime, and the failures ===


def _constant(rng, name, shape, low=-0.5, high=0.5):
    return numpy_helper.from_array(rng.uniform(low, high, shape).astype("float32"), name)


def _synthetic_model(nhwc_input=False, body_op=None):
    """A 32x32 body with every supported op, a 4x4x16 map `features`, then a GAP+Gemm head."""
    rng = np.random.default_rng(3)
    init = [
        numpy_helper.from_array(np.float32(2.0), "two"),
        _constant(rng, "w_stem", (8, 3, 3, 3)),
        _constant(rng, "b_stem", (8,)),
        _constant(rng, "bn_scale", (8,), 0.5, 1.5),
        _constant(rng, "bn_bias", (8,)),
        _constant(rng, "bn_mean", (8,)),
        _constant(rng, "bn_var", (8,), 0.5, 1.5),
        _constant(rng, "slope", (8, 1, 1), 0.05, 0.3),
        _constant(rng, "w_dw", (16, 1, 3, 3)),
        numpy_helper.from_array(np.float32(-0.5), "clip_min"),
        numpy_helper.from_array(np.float32(0.8), "clip_max"),
        _constant(rng, "w_group", (16, 4, 1, 1)),
        numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 0, 0, 1], "int64"), "pads"),
        _constant(rng, "w_valid", (16, 16, 2, 2)),
        _constant(rng, "w_se1", (4, 16, 1, 1)),
        _constant(rng, "w_se2", (16, 4, 1, 1)),
        _constant(rng, "channel_scale", (16,), 0.5, 1.5),
        _constant(rng, "w_last", (16, 16, 3, 3)),
        _constant(rng, "w_fc", (16, 5)),
    ]
    nodes = [
        helper.make_node("Div", ["x", "two"], ["halved"], name="halve"),
        helper.make_node("Conv", ["halved", "w_stem", "b_stem"], ["stem"], name="stem/conv", strides=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("BatchNormalization", ["stem", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"], name="stem/bn", epsilon=1e-3),
        helper.make_node("PRelu", ["bn", "slope"], ["prelu"], name="stem/prelu"),
        helper.make_node("Conv", ["prelu", "w_dw"], ["dw"], name="dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["dw", "clip_min", "clip_max"], ["clipped"], name="clip"),
        helper.make_node("Conv", ["clipped", "w_group"], ["grouped"], name="grouped", group=4),
        helper.make_node("Pad", ["grouped", "pads"], ["padded"], name="pad"),
        helper.make_node("Conv", ["padded", "w_valid"], ["valid"], name="valid"),
        helper.make_node("MaxPool", ["valid"], ["pooled"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["pooled"], ["se_pool"], name="se/pool"),
        helper.make_node("Conv", ["se_pool", "w_se1"], ["se_fc1"], name="se/fc1"),
        helper.make_node("Relu", ["se_fc1"], ["se_relu"], name="se/relu"),
        helper.make_node("Conv", ["se_relu", "w_se2"], ["se_fc2"], name="se/fc2"),
        helper.make_node("Sigmoid", ["se_fc2"], ["se_gate"], name="se/sigmoid"),
        helper.make_node("Mul", ["pooled", "se_gate"], ["se_out"], name="se/scale"),
        helper.make_node("Add", ["se_out", "pooled"], ["residual"], name="residual"),
        # A TF-style stretch: to NHWC, a per-channel scale on the last axis, back to NCHW.
        helper.make_node("Transpose", ["residual"], ["nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Mul", ["nhwc", "channel_scale"], ["scaled"], name="channel_scale"),
        helper.make_node("Transpose", ["scaled"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
        # A real transpose of the image (H <-> W), which the Keras tensor must follow.
        helper.make_node("Transpose", ["nchw"], ["swapped"], name="swap_hw", perm=[0, 1, 3, 2]),
        helper.make_node("Conv", ["swapped", "w_last"], ["last"], name="last/conv", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["last"], ["features"], name="last/relu"),
        helper.make_node("GlobalAveragePool", ["features"], ["gap"], name="head/pool"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="head/flatten"),
        helper.make_node("MatMul", ["flat", "w_fc"], ["embedding"], name="head/fc"),
    ]
    by_name = {node.name: index for index, node in enumerate(nodes)}
    if body_op == "Gather":  # an op the importer does not know, on the spatial path
        init.append(numpy_helper.from_array(np.array([0, 2, 5], "int64"), "channels"))
        nodes[by_name["pool"]] = helper.make_node("MaxPool", ["picked"], ["pooled"], name="pool", kernel_shape=[2, 2], strides=[2, 2])
        nodes.insert(by_name["pool"], helper.make_node("Gather", ["valid", "channels"], ["picked"], name="pick_channels", axis=1))
    if body_op == "HardSigmoid":  # one inside the 1x1 SE branch, which rejoins the body
        nodes[by_name["se/sigmoid"]] = helper.make_node("HardSigmoid", ["se_fc2"], ["se_gate"], name="se/sigmoid")
    image = "pixels" if nhwc_input else "x"
    if nhwc_input:  # as tf2onnx writes a Keras model: NHWC input, then a Transpose
        nodes.insert(0, helper.make_node("Transpose", ["pixels"], ["x"], name="input_to_nchw", perm=[0, 3, 1, 2]))
    shape = ["N", 32, 32, 3] if nhwc_input else ["N", 3, 32, 32]
    graph = helper.make_graph(
        nodes,
        "synthetic",
        [helper.make_tensor_value_info(image, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 5])],
        initializer=init,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _save(onnx_model, directory, name="synthetic.onnx"):
    path = pathlib.Path(directory) / name
    onnx.save(onnx_model, str(path))
    return path


@pytest.mark.parametrize("nhwc_input", [False, True], ids=["nchw", "nhwc"])
def test_synthetic_graph_matches_onnxruntime(tmp_path, nhwc_input):
    onnx_model = _synthetic_model(nhwc_input)
    backbone = backbones.from_onnx(_save(onnx_model, tmp_path), input_shape=(32, 32, 3))
    assert backbone.output.shape == (None, 4, 4, 16)
    assert backbone.layers[-1].name == "last_relu"
    pixels = np.random.default_rng(4).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    network_input = _nchw(pixels)
    feed = {"pixels": network_input.transpose(0, 2, 3, 1)} if nhwc_input else {"x": network_input}
    expected = _onnxruntime_tensor(onnx_model, "features", feed).transpose(0, 2, 3, 1)
    assert np.abs(backbone.predict(pixels, verbose=0) - expected).max() < TOLERANCE
    layer_types = {type(layer).__name__ for layer in backbone.layers}
    assert {"DepthwiseConv2D", "Conv2D", "BatchNormalization", "PReLU", "ZeroPadding2D", "Permute"} <= layer_types


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_conv_auto_pad_matches_onnxruntime(tmp_path, auto_pad):
    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", strides=[2, 2], auto_pad=auto_pad),
        helper.make_node("Conv", ["a", "w2"], ["features"], name="c2", strides=[2, 2], auto_pad=auto_pad),
        helper.make_node("Flatten", ["features"], ["flat"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes,
        "auto_pad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["N", None])],
        initializer=[_constant(rng, "w1", (8, 3, 3, 3)), _constant(rng, "w2", (8, 8, 2, 2))],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    backbone = backbones.from_onnx(_save(onnx_model, tmp_path), input_shape=(32, 32, 3))
    pixels = rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = _onnxruntime_tensor(onnx_model, "features", {"x": _nchw(pixels)}).transpose(0, 2, 3, 1)
    assert backbone.output.shape[1:] == expected.shape[1:]
    assert np.abs(backbone.predict(pixels, verbose=0) - expected).max() < TOLERANCE


def test_imported_backbone_saves_and_reloads(tmp_path):
    backbone = backbones.from_onnx(_save(_synthetic_model(), tmp_path), input_shape=(32, 32, 3))
    backbone.save(tmp_path / "imported.keras")
    reloaded = keras.saving.load_model(tmp_path / "imported.keras")
    pixels = np.random.default_rng(5).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(reloaded.predict(pixels, verbose=0), backbone.predict(pixels, verbose=0), atol=1e-6)


@pytest.mark.parametrize("op, node", [("Gather", "pick_channels"), ("HardSigmoid", "se/sigmoid")])
def test_unsupported_op_names_op_and_node(tmp_path, op, node):
    path = _save(_synthetic_model(body_op=op), tmp_path)
    with pytest.raises(ValueError, match=f"{op} node '{node}'"):
        backbones.from_onnx(path, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match=f"{op} node '{node}'"):
        backbones.from_onnx(path, input_shape=(32, 32, 3), feature_map="features")
    # Ending before the unknown op works.
    assert backbones.from_onnx(path, input_shape=(32, 32, 3), feature_map="valid").output.shape == (None, 16, 16, 16)


def test_bad_files_and_arguments_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        backbones.from_onnx(tmp_path / "missing.onnx")
    not_onnx = tmp_path / "photo.onnx"
    not_onnx.write_bytes(b"\xff\xd8\xff\xe0 this is a JPEG, not a model")
    with pytest.raises(ValueError, match="photo.onnx"):
        backbones.from_onnx(not_onnx)
    path = _save(_synthetic_model(), tmp_path)
    with pytest.raises(ValueError, match="no_such_node"):
        backbones.from_onnx(path, input_shape=(32, 32, 3), feature_map="no_such_node")
    with pytest.raises(ValueError, match="input_shape"):  # the graph is fixed at 32x32
        backbones.from_onnx(path)
