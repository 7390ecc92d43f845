"""The linear tail of an ONNX face model: its embedding as a sum of per-cell partial embeddings.

Face models end their convolutional body with a 7x7 map and then, at inference, only linear
ops: MobileFaceNet a depthwise 7x7 "GDConv" and a 1x1 conv (or Flatten + fully connected),
insightface's IResNet BN2d -> Flatten -> FC -> BN1d. So the embedding (before its L2
normalisation) is `e = sum_cells map_cell @ cell_weights[cell] + bias`, and each cell's term is
that cell's partial embedding. `from_onnx` imports the body; this reads the tail after the same
cut, exactly (to float32 rounding), from the ONNX weights.

Example:

```python
from xcos_tf import backbones

tail = backbones.read_linear_tail("../shared/models/teacher_mobilefacenet.onnx")
tail.cell_weights.shape  # (49, 512, 128): one 512 -> 128 map per cell of the 7x7 grid
body = backbones.from_onnx("../shared/models/teacher_mobilefacenet.onnx")
embedding = tail.embedding(body.predict(faces))  # the ONNX model's output, [N, 128]
```
"""
import dataclasses
import pathlib

import numpy as np
import onnx
from onnx import helper, numpy_helper

from xcos_tf.backbones import common, onnx_import

# Ops that are not linear in their input: a tail holding one on the path from the map to the
# output has no exact per-cell decomposition, so it is refused by name.
NONLINEAR_OPS = frozenset(
    {
        "Relu", "PRelu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish",
        "Tanh", "Softmax", "LogSoftmax", "Softplus", "Clip", "Abs", "Exp", "Log", "Sqrt", "Pow",
        "Reciprocal", "Max", "Min", "MaxPool", "GlobalMaxPool", "LpNormalization", "ReduceL2",
        "ReduceMax", "ReduceMin", "Mish", "Gelu", "Erf", "Sign", "Round", "Floor", "Ceil",
    }
)
# Ops whose output describes only the shape of a map-derived tensor, not its values.
_SHAPE_OPS = frozenset({"Shape", "Size"})
# A reconstruction further than this from onnxruntime means an op was read wrongly: refuse it.
_SELF_CHECK_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class LinearTail:
    """An ONNX model's embedding as a linear function of its feature map.

    Attributes:
        cell_weights: float32 `[cells, C_in, D]`, cell index `h * W + w` of the NHWC map.
        bias: float32 `[D]`, the embedding of an all-zero map.
        grid_shape: `(H, W)` of the map.
        feature_map: name of the ONNX tensor the tail starts at (where `from_onnx` cuts).
    """

    cell_weights: np.ndarray
    bias: np.ndarray
    grid_shape: tuple
    feature_map: str

    def partial_embeddings(self, feature_map):
        """`[N, H, W, C_in]` NHWC maps -> `[N, cells, D]` per-cell partial embeddings (no bias)."""
        maps = np.asarray(feature_map, dtype="float64")
        cells = maps.reshape(maps.shape[0], -1, maps.shape[-1])
        return np.einsum("nkc,kcd->nkd", cells, self.cell_weights.astype("float64"))

    def embedding(self, feature_map):
        """The model's embedding `[N, D]`: the sum of the partial embeddings plus the bias."""
        return self.partial_embeddings(feature_map).sum(axis=1) + self.bias


def read_linear_tail(onnx_path_or_model, feature_map=None, output=None, input_shape=(112, 112, 3)):
    """Reads the linear tail of an ONNX face model after the cut that `from_onnx` makes.

    Supported tail ops: Conv (any groups, kernel, strides, pads; e.g. the GDConv and a 1x1 conv),
    BatchNormalization, Gemm, MatMul, Flatten, Reshape, Squeeze, Unsqueeze, Transpose,
    GlobalAveragePool, Add, Sub, Mul and Div by constants, Identity, Dropout; Shape and its
    constant arithmetic (PyTorch's `x.view(x.size(0), -1)`).

    Args:
        onnx_path_or_model: str, path or `onnx.ModelProto`.
        feature_map: str or None, the node or tensor the tail starts at, as in `from_onnx`.
            Default None: where `from_onnx` cuts by default.
        output: str or None, the tensor holding the embedding `[N, D]` before any L2
            normalisation. Default None: the graph's only output.
        input_shape: tuple `(H, W, 3)`, the image size, as in `from_onnx`.

    Returns:
        A `LinearTail`.

    Raises:
        ValueError: a non-linear or unsupported op between the map and the output (the message
            names the op and node), an output that is not `[N, D]`, or an output that depends
            on the image other than through the map.
    """
    if isinstance(onnx_path_or_model, onnx.ModelProto):
        model = onnx_path_or_model
    elif isinstance(onnx_path_or_model, (str, pathlib.Path)):
        model = onnx_import.read_onnx_model(onnx_path_or_model)
    else:
        raise ValueError(f"read_linear_tail takes a path or an onnx.ModelProto. Received: {type(onnx_path_or_model).__name__}")
    graph = model.graph
    map_name, perm, keras_map_shape = _cut(graph, feature_map, input_shape)
    if output is None:
        if len(graph.output) != 1:
            raise ValueError(f"The graph has {len(graph.output)} outputs; pass output=<the embedding tensor>.")
        output = graph.output[0].name
    nodes = _tail_nodes(graph, map_name, output)
    linear = _linear_tensors(nodes, map_name)  # refuses a non-linear tail before running it
    onnx_map_shape = (2,) + tuple(keras_map_shape[p - 1] for p in perm[1:])  # a batch of 2 shows the batch axis
    session = _tail_session(model, nodes, map_name, onnx_map_shape)
    used = {name for node in nodes for name in node.input}
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in used}
    values.update(_run(session, map_name, np.zeros(onnx_map_shape, "float32")))
    bias = values[output]
    if bias.ndim != 2 or bias.shape[0] != 2:
        raise ValueError(f"The output {output!r} must be an embedding [N, D]. Received shape: {bias.shape} for N=2")
    jacobians = _backward(nodes, linear, values, map_name, onnx_map_shape, output)
    # [D, onnx axes 1..3] -> [D, H, W, C] (Keras layout) -> [H * W, C, D].
    inverse = np.argsort(perm)
    weights = np.transpose(jacobians, [0] + [int(inverse[axis]) for axis in (1, 2, 3)])
    weights = np.transpose(weights, (1, 2, 3, 0)).reshape(-1, weights.shape[-1], weights.shape[0])
    tail = LinearTail(weights.astype("float32"), bias[0].astype("float32"), tuple(keras_map_shape[:2]), map_name)
    _self_check(tail, session, map_name, output, onnx_map_shape, perm)
    return tail


def _cut(graph, feature_map, input_shape):
    """`from_onnx`'s own walk and choice of feature map, so that the tail starts where the body ends.

    Returns the ONNX tensor name, its perm (ONNX axis i is Keras axis perm[i]) and its Keras
    shape (H, W, C).
    """
    input_shape = common.check_input_shape(input_shape, "read_linear_tail")
    _, pixels = common.pixel_input(input_shape)
    name, tensor, _ = onnx_import.import_feature_map(graph, feature_map, input_shape, pixels)
    return name, tensor.perm, tuple(tensor.value.shape[1:])


def _tail_nodes(graph, map_name, output):
    """The nodes that compute `output` from the map (and constants), in graph order."""
    producers = {name: node for node in graph.node for name in node.output}
    initializers = {t.name for t in graph.initializer}
    image = onnx_import.graph_input_name(graph)
    needed, stack = set(), [output]
    while stack:
        name = stack.pop()
        if name in (map_name, "") or name in initializers:
            continue
        if name == image:
            raise ValueError(
                f"The output {output!r} depends on the image other than through feature_map {map_name!r} "
                "(e.g. a residual branch around it): no tail to read there."
            )
        node = producers.get(name)
        if node is None:
            raise ValueError(f"Tensor {name!r} on the way to the output is produced by no node.")
        if id(node) not in needed:
            needed.add(id(node))
            stack.extend(node.input)
    return [node for node in graph.node if id(node) in needed]


def _tail_session(model, nodes, map_name, map_shape):
    """An onnxruntime session of the tail alone, from the map to every tensor of the tail."""
    import onnxruntime  # only when a tail is read: importing xcos_tf.backbones stays light

    used = {name for node in nodes for name in node.input}
    graph = helper.make_graph(
        nodes,
        "tail",
        [helper.make_tensor_value_info(map_name, onnx.TensorProto.FLOAT, list(map_shape))],
        [helper.make_empty_tensor_value_info(name) for node in nodes for name in node.output if name],
        initializer=[t for t in model.graph.initializer if t.name in used],
    )
    tail = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    return onnxruntime.InferenceSession(tail.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(session, map_name, feature_map):
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {map_name: feature_map})))


def _linear_tensors(nodes, map_name):
    """The tensors whose values are linear in the map; refuses a node that is not linear in it."""
    linear = {map_name}
    for node in nodes:
        positions = [i for i, name in enumerate(node.input) if name in linear]
        if not positions or node.op_type in _SHAPE_OPS:
            continue  # a constant, or only the shape of a map-derived tensor
        where = f"{node.op_type} node {node.name!r}"
        if node.op_type in NONLINEAR_OPS:
            raise ValueError(f"The tail after the feature map is not linear: {where} is a non-linear op.")
        if node.op_type not in _BACKWARD:
            raise ValueError(f"The tail after the feature map has an unsupported op: {where}.")
        allowed = _LINEAR_POSITIONS.get(node.op_type, (0,))
        if any(p not in allowed for p in positions) or (node.op_type in ("Mul", "Div") and len(positions) > 1):
            raise ValueError(
                f"The tail after the feature map is not linear: {where} has map-derived inputs "
                f"at positions {positions} (a product or a divisor of the map is not linear)."
            )
        linear.update(name for name in node.output if name)
    return linear


def _backward(nodes, linear, values, map_name, map_shape, output):
    """d output / d map as `[D, *map_shape[1:]]`, carried back through the tail (float64)."""
    dims = values[output].shape[1]
    jacobians = {output: np.eye(dims)}
    for node in reversed(nodes):
        upstream = jacobians.get(node.output[0]) if node.output[0] in linear else None
        if upstream is None:
            continue
        shapes = [map_shape if name == map_name else np.shape(values.get(name)) for name in node.input]
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        for position, name in enumerate(node.input):
            if name not in linear:
                continue
            grad = _BACKWARD[node.op_type](node, position, upstream, shapes, values, attributes)
            if grad.shape[1:] != tuple(shapes[position][1:]):
                raise ValueError(f"{node.op_type} node {node.name!r} moves the batch axis; no per-sample tail there.")
            jacobians[name] = jacobians[name] + grad if name in jacobians else grad
    if map_name not in jacobians:
        raise ValueError(f"The output {output!r} does not depend on the feature map {map_name!r}.")
    return jacobians[map_name]


def _self_check(tail, session, map_name, output, map_shape, perm):
    """The reconstruction against onnxruntime on a random map: a misread op is an error, never a wrong tail."""
    onnx_map = np.random.default_rng(0).normal(size=map_shape).astype("float32")
    expected = _run(session, map_name, onnx_map)[output]
    got = tail.embedding(np.transpose(onnx_map, np.argsort(perm)))
    error = np.abs(got - expected).max() / (1.0 + np.abs(expected).max())
    if not error < _SELF_CHECK_TOLERANCE:
        raise ValueError(f"The tail read from the ONNX graph does not reproduce its output (relative error {error:.2e}).")


# === Backward rules: (node, input position, d out, input shapes, values, attributes) -> d input ===


def _reshape_back(node, position, upstream, shapes, values, attributes):
    return upstream.reshape((upstream.shape[0],) + tuple(shapes[0][1:]))


def _transpose_back(node, position, upstream, shapes, values, attributes):
    perm = attributes.get("perm", tuple(reversed(range(len(shapes[0])))))
    if perm[0] != 0:
        raise ValueError(f"Transpose node {node.name!r} moves the batch axis; no per-sample tail there.")
    inverse = np.argsort(perm)
    return np.transpose(upstream, [0] + [int(inverse[axis]) for axis in range(1, len(perm))])


def _batch_norm_back(node, position, upstream, shapes, values, attributes):
    scale, _, _, variance = (values[name] for name in node.input[1:5])
    factor = scale / np.sqrt(variance + attributes.get("epsilon", 1e-5))
    return upstream * factor.reshape((1, -1) + (1,) * (upstream.ndim - 2))


def _unbroadcast(product, shape):
    """Sums a `[D, *out[1:]]` gradient over the axes the input of `shape` was broadcast along."""
    axes = tuple(axis for axis in range(1, len(shape)) if shape[axis] == 1 and product.shape[axis] != 1)
    return product.sum(axis=axes, keepdims=True) if axes else product


def _elementwise_back(node, position, upstream, shapes, values, attributes):
    other = values.get(node.input[1 - position])
    out_shape = values[node.output[0]].shape
    if len(shapes[position]) != len(out_shape):
        raise ValueError(f"{node.op_type} node {node.name!r} broadcasts along new leading axes; not supported in a tail.")
    if node.op_type == "Add":
        factor = 1.0
    elif node.op_type == "Sub":
        factor = 1.0 if position == 0 else -1.0
    else:  # Mul, or Div with the map-derived tensor as the numerator
        constant = other if node.op_type == "Mul" else 1.0 / other
        factor = np.broadcast_to(constant, out_shape)[0][None]
    return _unbroadcast(upstream * factor, shapes[position])


def _gemm_back(node, position, upstream, shapes, values, attributes):
    if attributes.get("transA", 0):
        raise ValueError(f"Gemm node {node.name!r} transposes its input (transA=1); not supported in a tail.")
    weight = values[node.input[1]]
    weight = weight.T if attributes.get("transB", 0) else weight
    return attributes.get("alpha", 1.0) * upstream @ weight.T


def _matmul_back(node, position, upstream, shapes, values, attributes):
    weight = values[node.input[1]]
    if weight.ndim != 2:
        raise ValueError(f"MatMul node {node.name!r} has a weight of rank {weight.ndim}; only 2-D weights in a tail.")
    return np.einsum("...m,km->...k", upstream, weight)


def _global_average_pool_back(node, position, upstream, shapes, values, attributes):
    spatial = shapes[0][2:]
    return np.broadcast_to(upstream, upstream.shape[:2] + tuple(spatial)) / np.prod(spatial)


def _conv_back(node, position, upstream, shapes, values, attributes):
    """The transpose of a 2-D convolution, one kernel position at a time."""
    weight = values[node.input[1]]
    if weight.ndim != 4:
        raise ValueError(f"Conv node {node.name!r} is not 2-D; only 2-D convolutions in a tail.")
    _, channels, height, width = shapes[0]
    out_channels, group_channels, kernel_h, kernel_w = weight.shape
    groups = attributes.get("group", 1)
    stride_h, stride_w = attributes.get("strides", (1, 1))
    dilation_h, dilation_w = attributes.get("dilations", (1, 1))
    out_h, out_w = upstream.shape[2:]
    auto_pad = attributes.get("auto_pad", b"NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("NOTSET", "VALID"):
        top, left, bottom, right = attributes.get("pads", (0, 0, 0, 0)) if auto_pad == "NOTSET" else (0, 0, 0, 0)
    else:  # SAME_*: the padding that gives out = ceil(in / stride)
        total_h = max((out_h - 1) * stride_h + (kernel_h - 1) * dilation_h + 1 - height, 0)
        total_w = max((out_w - 1) * stride_w + (kernel_w - 1) * dilation_w + 1 - width, 0)
        top, left = (total_h // 2, total_w // 2) if auto_pad == "SAME_UPPER" else (total_h - total_h // 2, total_w - total_w // 2)
        bottom, right = total_h - top, total_w - left
    dims = upstream.shape[0]
    grouped_upstream = upstream.reshape(dims, groups, out_channels // groups, out_h, out_w)
    grouped_weight = weight.reshape(groups, out_channels // groups, group_channels, kernel_h, kernel_w)
    padded = np.zeros((dims, groups, group_channels, height + top + bottom, width + left + right))
    for i in range(kernel_h):
        for j in range(kernel_w):
            rows = slice(i * dilation_h, i * dilation_h + stride_h * (out_h - 1) + 1, stride_h)
            cols = slice(j * dilation_w, j * dilation_w + stride_w * (out_w - 1) + 1, stride_w)
            padded[:, :, :, rows, cols] += np.einsum("dgohw,goc->dgchw", grouped_upstream, grouped_weight[..., i, j])
    return padded[:, :, :, top : top + height, left : left + width].reshape(dims, channels, height, width)


_BACKWARD = {
    "Identity": _reshape_back,
    "Dropout": _reshape_back,
    "Flatten": _reshape_back,
    "Reshape": _reshape_back,
    "Squeeze": _reshape_back,
    "Unsqueeze": _reshape_back,
    "Transpose": _transpose_back,
    "BatchNormalization": _batch_norm_back,
    "Add": _elementwise_back,
    "Sub": _elementwise_back,
    "Mul": _elementwise_back,
    "Div": _elementwise_back,
    "Gemm": _gemm_back,
    "MatMul": _matmul_back,
    "GlobalAveragePool": _global_average_pool_back,
    "Conv": _conv_back,
}
# Input positions that may be map-derived (default: only the first; the rest are weights).
_LINEAR_POSITIONS = {"Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1)}
