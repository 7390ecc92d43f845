"""Bring your own pretrained model: the convolutional body of an ONNX face model as a backbone.

Example:

```python
from xcos_tf import backbones

# MobileFaceNet exported from PyTorch (NCHW, (x - 127.5) / 128): cut before its GDConv head.
backbone = backbones.from_onnx("../shared/models/teacher_mobilefacenet.onnx")
backbone.output.shape  # (None, 7, 7, 512), from RGB pixels 0..255 [N, 112, 112, 3]

# End at a named node (or tensor) instead: here the 14x14x128 stage.
backbones.from_onnx("../shared/models/teacher_mobilefacenet.onnx", feature_map="/features/features.6/Add")

# A tf2onnx export of a Keras model that scales its pixels itself: pass them through as is.
backbones.from_onnx("ir50.onnx", pixel_mean=0.0, pixel_scale=1.0)
```
"""
import math
import pathlib
import re

import keras
import numpy as np
import onnx
from onnx import numpy_helper

from xcos_tf.backbones import common

# `perm` of a tensor: ONNX axis i is axis perm[i] of the Keras tensor, which is always NHWC.
NCHW = (0, 3, 1, 2)
NHWC = (0, 1, 2, 3)

# Ops that end the convolutional body (the embedding head starts there): the automatic
# feature map search stops quietly at them, while any other unsupported op on a spatial
# tensor is an error rather than a silently shorter backbone.
HEAD_OPS = frozenset({"Flatten", "Reshape", "Gemm", "MatMul", "Squeeze", "Shape"})


class _Unsupported(Exception):
    """A node this importer cannot express in Keras; an error only if the feature map needs it."""


class _Tensor:
    """A Keras tensor (NHWC) and how the ONNX graph sees its axes."""

    def __init__(self, value, perm):
        self.value = value
        self.perm = tuple(perm)

    @property
    def spatial(self):
        return tuple(self.value.shape[1:3])


def _load(path):
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No ONNX model at {str(path)!r} (missing file).")
    try:
        model = onnx.load(str(path))
    except Exception as error:  # onnx raises protobuf DecodeError, RuntimeError, ... by case
        raise ValueError(f"{str(path)!r} is not a readable ONNX model: {error}") from None
    if not model.graph.node:
        raise ValueError(f"{str(path)!r} is not an ONNX model with a graph (no nodes found).")
    return model


def _attributes(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _keras_layout(constant, perm):
    """An ONNX constant broadcast against a 4-D tensor, rearranged to the Keras tensor's axes."""
    constant = np.asarray(constant, dtype="float32")
    if constant.ndim > 4:
        raise _Unsupported(f"a constant of shape {constant.shape} (rank above 4)")
    constant = constant.reshape((1,) * (4 - constant.ndim) + constant.shape)
    return np.transpose(constant, np.argsort(perm))


def _per_channel(constant, channels):
    """A constant in Keras layout as one value per channel, or an error for other shapes."""
    if constant.shape[:3] != (1, 1, 1) or constant.shape[3] not in (1, channels):
        raise _Unsupported(f"a constant of shape {constant.shape} (only scalars or one per channel)")
    return np.broadcast_to(constant[0, 0, 0], (channels,)).astype("float32")


class _Importer:
    """Walks the ONNX graph in order and builds the Keras layers of every node it can."""

    def __init__(self, graph, input_perm, pixels):
        self.constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.tensors = {_graph_input_name(graph): _Tensor(pixels, input_perm)}
        self.blocked = {}  # tensor name -> why it cannot be computed
        self.root_blockers = []  # (node, reason, inputs) where a chain of blocked tensors starts
        self.order = []  # converted tensor names, in graph order
        self.rejoined = []  # reasons of blocked branches that flow back into the spatial body
        self.layer_names = {"image", "pixel_scaling"}  # taken by common.pixel_input
        self.weights = {}  # layer name -> ONNX weights in Keras layout, set once the model exists
        self.producers = {output: node for node in graph.node for output in node.output}

    # --- naming -------------------------------------------------------------------------
    def layer_name(self, node, suffix=""):
        base = _keras_safe(node.name) or node.op_type.lower()
        if base[0].isdigit():
            base = f"{node.op_type.lower()}_{base}"
        name, count = f"{base}{suffix}", 1
        while name in self.layer_names:
            count += 1
            name = f"{base}{suffix}_{count}"
        self.layer_names.add(name)
        return name

    # --- layout -------------------------------------------------------------------------
    def with_perm(self, tensor, perm, node):
        """The same ONNX tensor, its Keras value rearranged so that ONNX sees it as `perm`."""
        axes = tuple(tensor.perm[i] for i in np.argsort(perm))
        if axes == NHWC:
            return _Tensor(tensor.value, perm)
        if axes[0] != 0:
            raise _Unsupported(f"a transpose of the batch axis (perm {tensor.perm})")
        permute = keras.layers.Permute(tuple(int(a) for a in axes[1:]), name=self.layer_name(node, "_permute"))
        value = permute(tensor.value)
        return _Tensor(value, perm)

    def producer(self, name, op_type):
        """The node of type `op_type` that computes tensor `name`, or None."""
        node = self.producers.get(name)
        return node if node is not None and node.op_type == op_type else None

    # --- the walk -----------------------------------------------------------------------
    def run(self, graph):
        for node in graph.node:
            inputs = [self.lookup(name) for name in node.input]
            blocked = next((i for i in inputs if isinstance(i, str)), None)
            if blocked is not None:
                if any(isinstance(i, _Tensor) and min(i.spatial) > 1 for i in inputs):
                    # A branch that did not import rejoins the spatial body (e.g. an SE gate).
                    self.rejoined.append(blocked)
                self.block(node, blocked)
                continue
            try:
                outputs = self.convert(node, inputs)
            except _Unsupported as error:
                reason = f"{node.op_type} node {node.name!r}: {error}"
                self.root_blockers.append((node, reason, inputs))
                self.block(node, reason)
                continue
            for name, value in zip(node.output, outputs):
                if isinstance(value, _Tensor):
                    self.tensors[name] = value
                    self.order.append(name)
                else:
                    self.constants[name] = value

    def lookup(self, name):
        if not name:
            return None  # an omitted optional input
        for table in (self.tensors, self.constants):
            if name in table:
                return table[name]
        return self.blocked.get(name, f"input {name!r} is not produced by any node")

    def block(self, node, reason):
        for name in node.output:
            self.blocked[name] = reason

    def convert(self, node, inputs):
        if node.op_type == "Constant":
            (value,) = _attributes(node).values()  # `value`, or `value_float(s)`/`value_int(s)`
            return [numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)]
        converter = _CONVERTERS.get(node.op_type)
        if converter is None:
            raise _Unsupported("unsupported op")
        # The image-derived operand comes first, except for binary ops, where either may be it.
        operands = inputs[:2] if converter is _binary else inputs[:1]
        if not any(isinstance(i, _Tensor) for i in operands):
            raise _Unsupported("computes a constant (constant folding is not supported)")
        return converter(self, node, inputs, _attributes(node))


def _graph_input_name(graph):
    initializers = {t.name for t in graph.initializer}
    names = [i.name for i in graph.input if i.name not in initializers]
    if len(names) != 1:
        raise ValueError(f"from_onnx expects a graph with one image input. Received inputs: {names}")
    return names[0]


def _input_layout(graph, input_shape):
    """NCHW (e.g. from PyTorch) or NHWC (e.g. from tf2onnx), read off the 3-channel axis."""
    graph_input = next(i for i in graph.input if i.name == _graph_input_name(graph))
    dims = [d.dim_value or None for d in graph_input.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise ValueError(f"Input {graph_input.name!r} must be 4-D images. Received dims: {dims}")
    if dims[1] == 3 and dims[3] != 3:
        perm, spatial = NCHW, dims[2:4]
    elif dims[3] == 3 and dims[1] != 3:
        perm, spatial = NHWC, dims[1:3]
    else:
        raise ValueError(
            f"Cannot tell whether input {graph_input.name!r} is NCHW or NHWC: it needs exactly "
            f"one axis of 3 colour channels at position 1 or 3. Received dims: {dims}"
        )
    for size, wanted in zip(spatial, input_shape[:2]):
        if size is not None and size != wanted:
            raise ValueError(
                f"The ONNX model's input {graph_input.name!r} is fixed at {spatial[0]}x{spatial[1]} "
                f"pixels. Received: input_shape={tuple(input_shape)}"
            )
    return perm


# === Converters: (importer, node, inputs, attributes) -> outputs ===


def _explicit_pads(attributes, tensor, kernel, strides, dilations):
    """ONNX `pads`/`auto_pad` as ((top, bottom), (left, right))."""
    auto_pad = attributes.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", "VALID"):
        pads = attributes.get("pads", [0, 0, 0, 0]) if auto_pad == "NOTSET" else [0, 0, 0, 0]
        return (pads[0], pads[2]), (pads[1], pads[3])
    pairs = []
    for size, k, s, d in zip(tensor.spatial, kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        pairs.append((small, large) if auto_pad == "SAME_UPPER" else (large, small))
    return tuple(pairs)


def _zero_pad(importer, node, value, pads):
    """`pads` ((top, bottom), (left, right)) on an NHWC Keras value; explicit, so asymmetric works."""
    if any(p < 0 for pair in pads for p in pair):
        raise _Unsupported(f"negative pads {pads}")
    if not any(p for pair in pads for p in pair):
        return value
    return keras.layers.ZeroPadding2D(pads, name=importer.layer_name(node, "_pad"))(value)


def _conv(importer, node, inputs, attributes):
    x, kernel, bias = (inputs + [None])[:3]
    if not isinstance(kernel, np.ndarray) or (bias is not None and not isinstance(bias, np.ndarray)):
        raise _Unsupported("weights that are not constants")
    if kernel.ndim != 4:
        raise _Unsupported(f"a {kernel.ndim - 2}-D convolution (only 2-D)")
    x = importer.with_perm(x, NCHW, node)
    out_channels, group_channels, kh, kw = kernel.shape
    strides = tuple(attributes.get("strides", (1, 1)))
    dilations = tuple(attributes.get("dilations", (1, 1)))
    groups = attributes.get("group", 1)
    in_channels = x.value.shape[-1]
    if group_channels * groups != in_channels:
        raise _Unsupported(f"weights {kernel.shape} that do not fit {in_channels} input channels")
    if max(strides) > 1 and max(dilations) > 1:
        raise _Unsupported(f"strides {strides} together with dilations {dilations}")
    padded = _zero_pad(importer, node, x.value, _explicit_pads(attributes, x, (kh, kw), strides, dilations))
    options = dict(strides=strides, dilation_rate=dilations, use_bias=bias is not None, name=importer.layer_name(node))
    if groups == in_channels and groups > 1:
        multiplier = out_channels // in_channels
        layer = keras.layers.DepthwiseConv2D((kh, kw), depth_multiplier=multiplier, **options)
        # ONNX output channel c * multiplier + j comes from input channel c, as in Keras.
        keras_kernel = kernel.reshape(in_channels, multiplier, kh, kw).transpose(2, 3, 0, 1)
    else:
        layer = keras.layers.Conv2D(out_channels, (kh, kw), groups=groups, **options)
        keras_kernel = kernel.transpose(2, 3, 1, 0)
    value = layer(padded)
    importer.weights[layer.name] = [keras_kernel] + ([bias] if bias is not None else [])
    return [_Tensor(value, NCHW)]


def _batch_normalization(importer, node, inputs, attributes):
    x, *statistics = inputs
    if len(statistics) != 4 or not all(isinstance(s, np.ndarray) for s in statistics):
        raise _Unsupported("statistics that are not constants")
    x = importer.with_perm(x, NCHW, node)
    name = importer.layer_name(node)
    value = common.batch_norm(x.value, name, epsilon=attributes.get("epsilon", 1e-5))
    importer.weights[name] = statistics  # ONNX order: scale, bias, mean, var, as Keras keeps them
    return [_Tensor(value, NCHW)]


def _prelu(importer, node, inputs, attributes):
    x, slope = inputs
    if not isinstance(slope, np.ndarray):
        raise _Unsupported("a slope that is not a constant")
    return [_prelu_layer(importer, node, x, slope)]


def _prelu_layer(importer, node, x, slope):
    alpha = _per_channel(_keras_layout(slope, x.perm), x.value.shape[-1])
    name = importer.layer_name(node)
    value = common.prelu(x.value, name)
    importer.weights[name] = [alpha.reshape(1, 1, -1)]
    return _Tensor(value, x.perm)


def _decomposed_prelu(importer, node):
    """(x, slope) when `node` is tf2onnx's Keras PReLU, Relu(x) + Relu(Neg(x)) * -slope, else None."""
    for positive, negative in (tuple(node.input), tuple(node.input)[::-1]):
        relu = importer.producer(positive, "Relu")
        mul = importer.producer(negative, "Mul")
        if relu is None or mul is None:
            continue
        for product, constant in (tuple(mul.input), tuple(mul.input)[::-1]):
            negative_relu = importer.producer(product, "Relu")
            neg = importer.producer(negative_relu.input[0], "Neg") if negative_relu is not None else None
            if neg is not None and neg.input[0] == relu.input[0] and constant in importer.constants:
                return importer.tensors[relu.input[0]], -importer.constants[constant]
    return None


def _clip(importer, node, inputs, attributes):
    x, low, high = (inputs + [None, None])[:3]
    if not all(bound is None or isinstance(bound, np.ndarray) for bound in (low, high)):
        raise _Unsupported("bounds that are not constants")
    low = float(low) if low is not None else attributes.get("min")
    high = float(high) if high is not None else attributes.get("max")
    if low == 0.0:
        value = keras.layers.ReLU(max_value=high, name=importer.layer_name(node))(x.value)
        return [_Tensor(value, x.perm)]
    if low is None or high is None:
        raise _Unsupported(f"a one-sided clip to [{low}, {high}] other than ReLU")
    # clip(x, low, high) = low + relu6-style clip of (x - low) to [0, high - low].
    value = keras.layers.Rescaling(1.0, offset=-low, name=importer.layer_name(node, "_shift"))(x.value)
    value = keras.layers.ReLU(max_value=high - low, name=importer.layer_name(node))(value)
    value = keras.layers.Rescaling(1.0, offset=low, name=importer.layer_name(node, "_unshift"))(value)
    return [_Tensor(value, x.perm)]


def _affine(importer, node, x, scale, offset):
    """x * scale + offset with constants of one value overall or per channel."""
    scale, offset = _keras_layout(scale, x.perm), _keras_layout(offset, x.perm)
    if scale.size == 1 and offset.size == 1:
        layer = keras.layers.Rescaling(float(scale.flat[0]), offset=float(offset.flat[0]), name=importer.layer_name(node))
        return _Tensor(layer(x.value), x.perm)
    channels = x.value.shape[-1]
    scale, offset = _per_channel(scale, channels), _per_channel(offset, channels)
    # A 1x1 depthwise conv is the standard Keras layer for a per-channel scale and shift.
    layer = keras.layers.DepthwiseConv2D(1, name=importer.layer_name(node))
    value = layer(x.value)
    importer.weights[layer.name] = [scale.reshape(1, 1, channels, 1), offset]
    return _Tensor(value, x.perm)


_MERGE_LAYERS = {"Add": keras.layers.Add, "Sub": keras.layers.Subtract, "Mul": keras.layers.Multiply}


def _binary(importer, node, inputs, attributes):
    a, b = inputs
    if isinstance(a, _Tensor) and isinstance(b, _Tensor):
        if node.op_type not in _MERGE_LAYERS:
            raise _Unsupported("two tensor operands")
        prelu = _decomposed_prelu(importer, node) if node.op_type == "Add" else None
        if prelu is not None:
            try:  # one PReLU layer, as in the Keras model tf2onnx started from
                return [_prelu_layer(importer, node, *prelu)]
            except _Unsupported:
                pass  # a slope that is not per channel: keep the ops as they are
        b = importer.with_perm(b, a.perm, node)
        value = _MERGE_LAYERS[node.op_type](name=importer.layer_name(node))([a.value, b.value])
        return [_Tensor(value, a.perm)]
    x, c, tensor_first = (a, b, True) if isinstance(a, _Tensor) else (b, a, False)
    c = np.asarray(c, dtype="float32")
    one, zero = np.float32(1), np.float32(0)
    scale, offset = {
        "Add": (one, c),
        "Sub": (one, -c) if tensor_first else (-one, c),
        "Mul": (c, zero),
        "Div": (one / c, zero) if tensor_first else (None, None),
    }[node.op_type]
    if scale is None:
        raise _Unsupported("a constant divided by a tensor")
    return [_affine(importer, node, x, scale, offset)]


def _neg(importer, node, inputs, attributes):
    return [_affine(importer, node, inputs[0], np.float32(-1), np.float32(0))]


def _activation(keras_name):
    def convert(importer, node, inputs, attributes):
        x = inputs[0]
        value = keras.layers.Activation(keras_name, name=importer.layer_name(node))(x.value)
        return [_Tensor(value, x.perm)]

    return convert


def _global_average_pool(importer, node, inputs, attributes):
    x = importer.with_perm(inputs[0], NCHW, node)
    value = keras.layers.GlobalAveragePooling2D(keepdims=True, name=importer.layer_name(node))(x.value)
    return [_Tensor(value, NCHW)]


def _max_pool(importer, node, inputs, attributes):
    x = importer.with_perm(inputs[0], NCHW, node)
    kernel = tuple(attributes["kernel_shape"])
    strides = tuple(attributes.get("strides", (1, 1)))
    if attributes.get("ceil_mode", 0) or max(attributes.get("dilations", (1, 1))) > 1:
        raise _Unsupported("ceil_mode or dilations")
    if len(node.output) > 1:
        raise _Unsupported("the Indices output")
    # Zero padding would change a max over negative values, so only unpadded pooling maps.
    if any(p for pair in _explicit_pads(attributes, x, kernel, strides, (1, 1)) for p in pair):
        raise _Unsupported("padding (ONNX pads a max pool with -inf; Keras cannot here)")
    value = keras.layers.MaxPooling2D(kernel, strides, name=importer.layer_name(node))(x.value)
    return [_Tensor(value, NCHW)]


def _pad_node(importer, node, inputs, attributes):
    x, pads, constant = (inputs + [None, None])[:3]
    pads = attributes.get("pads") if pads is None else pads  # an attribute before opset 11
    constant = attributes.get("value", 0.0) if constant is None else constant
    mode = attributes.get("mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant" or np.any(constant):
        raise _Unsupported(f"padding mode {mode!r} or a non-zero pad value (only zeros)")
    if len(inputs) > 3 and inputs[3] is not None:
        raise _Unsupported("the `axes` input")
    pads = [int(p) for p in np.asarray(pads).ravel()]
    begin, end = pads[:4], pads[4:]
    keras_begin, keras_end = [0] * 4, [0] * 4
    for onnx_axis, keras_axis in enumerate(x.perm):
        keras_begin[keras_axis], keras_end[keras_axis] = begin[onnx_axis], end[onnx_axis]
    if keras_begin[0] or keras_end[0] or keras_begin[3] or keras_end[3]:
        raise _Unsupported(f"padding outside the spatial axes (pads {pads})")
    padded = _zero_pad(importer, node, x.value, tuple(zip(keras_begin[1:3], keras_end[1:3])))
    return [_Tensor(padded, x.perm)]


def _reshape(importer, node, inputs, attributes):
    """Only reshapes that move size-1 axes ([N, C, 1, 1] <-> [N, 1, 1, C]): a new view, no layer."""
    x, shape = inputs
    if not isinstance(shape, np.ndarray) or x.perm[0] != 0:
        raise _Unsupported("a shape that is not a constant, or a moved batch axis")
    onnx_shape = [x.value.shape[axis] for axis in x.perm]
    target = [onnx_shape[i] if d == 0 and not attributes.get("allowzero", 0) else int(d) for i, d in enumerate(shape)]
    if len(target) != 4 or target[1:].count(-1) > 1 or min(target[1:]) < -1:
        raise _Unsupported(f"a reshape to {shape.tolist()} (only 4-D with the batch first)")
    if -1 in target[1:]:  # the one inferred size, as the batch keeps its place
        known = math.prod(d for d in target[1:] if d != -1)
        target[target.index(-1, 1)] = math.prod(onnx_shape[1:]) // known
    sources = [i for i in (1, 2, 3) if onnx_shape[i] != 1]
    destinations = [i for i in (1, 2, 3) if target[i] != 1]
    if [onnx_shape[i] for i in sources] != [target[i] for i in destinations]:
        raise _Unsupported(f"a reshape from {onnx_shape} to {target} that moves data")
    perm = [0, None, None, None]
    for source, destination in zip(sources, destinations):
        perm[destination] = x.perm[source]
    unit_axes = sorted({1, 2, 3} - set(perm))  # Keras axes of size 1, in order
    for destination in (i for i in (1, 2, 3) if perm[i] is None):
        perm[destination] = unit_axes.pop(0)
    return [_Tensor(x.value, perm)]


def _identity(importer, node, inputs, attributes):
    return [inputs[0]]


def _transpose(importer, node, inputs, attributes):
    x = inputs[0]
    perm = attributes.get("perm", tuple(reversed(range(len(x.perm)))))
    return [_Tensor(x.value, tuple(x.perm[i] for i in perm))]


_CONVERTERS = {
    "Conv": _conv,
    "BatchNormalization": _batch_normalization,
    "Relu": _activation("relu"),
    "Sigmoid": _activation("sigmoid"),
    "Clip": _clip,
    "PRelu": _prelu,
    "Add": _binary,
    "Sub": _binary,
    "Mul": _binary,
    "Div": _binary,
    "Neg": _neg,
    "GlobalAveragePool": _global_average_pool,
    "MaxPool": _max_pool,
    "Pad": _pad_node,
    "Identity": _identity,
    "Dropout": _identity,  # inference graphs: dropout passes its input through
    "Transpose": _transpose,
    "Reshape": _reshape,
}


def _feature_map_name(importer, graph, feature_map):
    """The ONNX tensor the backbone ends at: the one named, or the last of the smallest grid."""
    if feature_map is not None:
        node = next((n for n in graph.node if n.name == feature_map), None)
        tensor_name = node.output[0] if node is not None else feature_map
        if tensor_name in importer.tensors:
            return tensor_name
        if tensor_name in importer.blocked:
            raise ValueError(
                f"Cannot import up to feature_map={feature_map!r}: it needs {importer.blocked[tensor_name]}."
            )
        raise ValueError(f"feature_map={feature_map!r} names no node or tensor computed from the image input.")
    body_errors = [
        reason
        for node, reason, inputs in importer.root_blockers
        if node.op_type not in HEAD_OPS and any(isinstance(i, _Tensor) and min(i.spatial) > 1 for i in inputs)
    ]
    if body_errors or importer.rejoined:
        raise ValueError(
            f"Cannot import the convolutional body: {(body_errors + importer.rejoined)[0]}. "
            "Pass feature_map=<node or tensor name> to end the backbone before it."
        )
    grids = [(name, importer.tensors[name].spatial) for name in importer.order]
    grids = [(name, spatial) for name, spatial in grids if min(spatial) > 1]
    if not grids:
        raise ValueError("The ONNX graph has no spatial feature map (no tensor larger than 1x1 after the input).")
    # The spatial size shrinks stage by stage; where it collapses to 1x1 the embedding head starts.
    smallest = min(spatial[0] * spatial[1] for _, spatial in grids)
    return [name for name, spatial in grids if spatial[0] * spatial[1] == smallest][-1]


def _keras_safe(text):
    return re.sub(r"[^0-9A-Za-z_]+", "_", text).strip("_")


def from_onnx(path, feature_map=None, input_shape=(112, 112, 3), pixel_mean=127.5, pixel_scale=1 / 128, name=None):
    """Imports the convolutional body of an ONNX face model as a Keras backbone.

    The model is cut at its last feature map before the spatial size collapses (the 7x7 map of
    a 112x112 face, before a GDConv, flatten or fully connected head), or at `feature_map`.
    Inputs are RGB pixels 0..255 NHWC like every backbone in `xcos_tf.backbones`; the ONNX
    model's own preprocessing `(x - pixel_mean) * pixel_scale` is done inside. Both NCHW graphs
    (PyTorch exports) and NHWC graphs with Transposes (tf2onnx exports) import.

    Supported ops: Conv (plain, depthwise, grouped), BatchNormalization, Relu, Clip, PRelu,
    Sigmoid, Add, Sub, Mul, Div, Neg, GlobalAveragePool, MaxPool (unpadded), Pad (zeros),
    Transpose, Identity, Dropout.

    Args:
        path: str or path, the `.onnx` file.
        feature_map: str or None, the name of the node or tensor to end at. Default None
            picks the last tensor with the smallest spatial size above 1x1.
        input_shape: tuple (H, W, 3), H and W multiples of 16. Default (112, 112, 3).
        pixel_mean: float, subtracted from the pixels. Default 127.5.
        pixel_scale: float, multiplies the centred pixels. Default 1/128.
        name: str or None, the Keras model name. Default: from the file name.

    Returns:
        A `keras.Model` from `image` [N, H, W, 3] to the NHWC feature map, with the ONNX
        weights; layer names are derived from the ONNX node names.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: not an ONNX model, an input that is not one 3-channel image, or an op
            the backbone needs that cannot be imported (the message names the op and node).
    """
    onnx_model = _load(path)
    graph = onnx_model.graph
    name = name or _keras_safe(pathlib.Path(path).stem) or "onnx_backbone"
    input_shape = common.check_input_shape(input_shape, name)
    image, pixels = common.pixel_input(input_shape, scale=pixel_scale, offset=-pixel_mean * pixel_scale)
    importer = _Importer(graph, _input_layout(graph, input_shape), pixels)
    importer.run(graph)
    features = importer.tensors[_feature_map_name(importer, graph, feature_map)].value
    backbone = keras.Model(image, features, name=name)
    for layer in backbone.layers:
        if layer.name in importer.weights:
            layer.set_weights(importer.weights[layer.name])
    return backbone
