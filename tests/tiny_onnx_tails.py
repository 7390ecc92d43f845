"""Tiny ONNX face models (32x32 pixels -> a 4x4x16 map -> a 10-d embedding) with the tails
real face models have, for the linear-tail reader and the exact decomposition."""
import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

MAP = "features"  # the 4x4x16 map where from_onnx cuts (NCHW [N, 16, 4, 4])
EMBEDDING = 10
TAILS = ("gdconv", "gdconv_bn", "gdconv_flatten_gemm", "fc_bn", "fc_view", "fc_nhwc_matmul")


def _array(rng, name, shape, low=-0.5, high=0.5):
    return numpy_helper.from_array(rng.uniform(low, high, shape).astype("float32"), name)


def _batch_norm(rng, prefix, channels, source, target):
    init = [
        _array(rng, f"{prefix}_scale", (channels,), 0.5, 1.5),
        _array(rng, f"{prefix}_bias", (channels,)),
        _array(rng, f"{prefix}_mean", (channels,)),
        _array(rng, f"{prefix}_var", (channels,), 0.5, 1.5),
    ]
    node = helper.make_node(
        "BatchNormalization", [source] + [t.name for t in init], [target], name=f"{prefix}/bn", epsilon=1e-3
    )
    return init, [node]


def _int64(name, values):
    return numpy_helper.from_array(np.array(values, "int64"), name)


def _tail(kind, rng, nonlinear=None):
    """(initializers, nodes) from MAP to `embedding`."""
    if kind.startswith("gdconv"):
        init = [_array(rng, "w_gd", (16, 1, 4, 4)), _array(rng, "b_gd", (16,)), _array(rng, "w_lin", (EMBEDDING, 16, 1, 1)), _array(rng, "b_lin", (EMBEDDING,))]
        nodes = [helper.make_node("Conv", [MAP, "w_gd", "b_gd"], ["gd"], name="gdconv/depthwise", group=16)]
        source = "gd"
        if kind == "gdconv_bn":  # BN not folded into the GDConv, as in an unfused PyTorch export
            more_init, more_nodes = _batch_norm(rng, "gd", 16, "gd", "gd_bn")
            init, nodes, source = init + more_init, nodes + more_nodes, "gd_bn"
        if nonlinear:
            slope = [_array(rng, "gd_slope", (16, 1, 1), 0.05, 0.3)] if nonlinear == "PRelu" else []
            init += slope
            nodes.append(helper.make_node(nonlinear, [source] + [t.name for t in slope], ["gd_act"], name="gdconv/act"))
            source = "gd_act"
        if kind == "gdconv_flatten_gemm":  # Flatten + Linear instead of a 1x1 conv
            init[2] = numpy_helper.from_array(numpy_helper.to_array(init[2]).reshape(EMBEDDING, 16), "w_lin")
            nodes += [
                helper.make_node("Flatten", [source], ["gd_flat"], name="flatten"),
                helper.make_node("Gemm", ["gd_flat", "w_lin", "b_lin"], ["linear"], name="linear", transB=1),
            ]
            more_init, more_nodes = _batch_norm(rng, "features_bn", EMBEDDING, "linear", "embedding")
            return init + more_init, nodes + more_nodes
        init.append(_int64("out_shape", [-1, EMBEDDING]))
        nodes += [
            helper.make_node("Conv", [source, "w_lin", "b_lin"], ["linear"], name="linear/conv"),
            helper.make_node("Reshape", ["linear", "out_shape"], ["embedding"], name="reshape"),
        ]
        return init, nodes
    # insightface IResNet: BN2d -> dropout -> flatten -> FC -> BN1d, in three spellings of the flatten.
    init, nodes = _batch_norm(rng, "bn2", 16, MAP, "bn2_out")
    nodes.append(helper.make_node("Dropout", ["bn2_out"], ["dropped"], name="dropout"))
    if kind == "fc_bn":
        init.append(_array(rng, "w_fc", (EMBEDDING, 16 * 16)))
        init.append(_array(rng, "b_fc", (EMBEDDING,)))
        nodes += [
            helper.make_node("Flatten", ["dropped"], ["flat"], name="flatten"),
            helper.make_node("Gemm", ["flat", "w_fc", "b_fc"], ["fc"], name="fc", transB=1, alpha=0.5),
        ]
    elif kind == "fc_view":  # PyTorch's x.view(x.size(0), -1): the shape computed in the graph
        init += [_array(rng, "w_fc", (16 * 16, EMBEDDING)), _array(rng, "b_fc", (EMBEDDING,)), _int64("zero", [0]), _int64("minus_one", [-1])]
        nodes += [
            helper.make_node("Shape", ["dropped"], ["shape"], name="view/shape"),
            helper.make_node("Gather", ["shape", "zero"], ["batch"], name="view/gather", axis=0),
            helper.make_node("Concat", ["batch", "minus_one"], ["view_shape"], name="view/concat", axis=0),
            helper.make_node("Reshape", ["dropped", "view_shape"], ["flat"], name="view/reshape"),
            helper.make_node("MatMul", ["flat", "w_fc"], ["fc_raw"], name="fc/matmul"),
            helper.make_node("Add", ["fc_raw", "b_fc"], ["fc"], name="fc/add"),
        ]
    elif kind == "fc_nhwc_matmul":  # a tf2onnx-style flatten in H, W, C order
        init += [_array(rng, "w_fc", (16 * 16, EMBEDDING)), _int64("flat_shape", [-1, 16 * 16]), numpy_helper.from_array(np.float32(2.0), "two")]
        nodes += [
            helper.make_node("Transpose", ["dropped"], ["nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", ["nhwc", "flat_shape"], ["flat"], name="flatten"),
            helper.make_node("MatMul", ["flat", "w_fc"], ["fc_raw"], name="fc/matmul"),
            helper.make_node("Div", ["fc_raw", "two"], ["fc"], name="fc/halve"),
        ]
    more_init, more_nodes = _batch_norm(rng, "features_bn", EMBEDDING, "fc", "embedding")
    return init + more_init, nodes + more_nodes


def tiny_face_model(tail="gdconv", nonlinear=None, seed=0):
    """A 32x32 NCHW body (convs, BN, PRelu, stride 8) to MAP, then the named tail to `embedding`.

    `nonlinear` (an op type such as "Relu") is inserted after the GDConv of a gdconv tail.
    """
    rng = np.random.default_rng(seed)
    init = [
        _array(rng, "w1", (8, 3, 3, 3)), _array(rng, "b1", (8,)), _array(rng, "slope", (8, 1, 1), 0.05, 0.3),
        _array(rng, "w2", (12, 8, 3, 3)), _array(rng, "w3", (16, 12, 3, 3)), _array(rng, "b3", (16,)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("PRelu", ["c1", "slope"], ["a1"], name="prelu1"),
        helper.make_node("Conv", ["a1", "w2"], ["c2"], name="conv2", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["a2"], name="relu2"),
        helper.make_node("Conv", ["a2", "w3", "b3"], ["c3"], name="conv3", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c3"], [MAP], name="relu3"),
    ]
    tail_init, tail_nodes = _tail(tail, rng, nonlinear)
    graph = helper.make_graph(
        nodes + tail_nodes,
        f"tiny_{tail}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", EMBEDDING])],
        initializer=init + tail_init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


FACE_SHAPE = (112, 112, 3)  # the faces tiny_face_model_112 takes, NHWC


def tiny_face_model_112():
    """`tiny_face_model("gdconv")` on 112x112 faces (those the feature cache and the export take):
    a 4x4 max pooling first, then the 28x28 -> 4x4x16 body and the GDConv tail."""
    model = tiny_face_model("gdconv")
    graph = model.graph
    for node in graph.node:
        node.input[:] = ["x_pooled" if name == "x" else name for name in node.input]
    graph.node.insert(0, helper.make_node("MaxPool", ["x"], ["x_pooled"], name="pool", kernel_shape=[4, 4], strides=[4, 4]))
    graph.input[0].type.tensor_type.shape.dim[2].dim_value = 112
    graph.input[0].type.tensor_type.shape.dim[3].dim_value = 112
    onnx.checker.check_model(model)
    return model


def run_onnx(model, pixels, tensors=("embedding",)):
    """onnxruntime's values of `tensors` for RGB pixels 0..255 NHWC (scaled as from_onnx does)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in tensors if name not in outputs)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = ((np.asarray(pixels, "float32") - 127.5) / 128).transpose(0, 3, 1, 2)
    return session.run(list(tensors), {"x": x})
