"""The ONNX ops `xcos_tf.backbones.from_onnx` imports, each as a converter
`(importer, node, inputs, attributes) -> outputs` of Keras layers, and the tensor bookkeeping
they share (axis order of each tensor, constants in Keras layout)."""
import math

import keras
import numpy as np
import onnx

from xcos_tf.backbones import common

# `perm` of a tensor: ONNX axis i is axis perm[i] of the Keras tensor, which is always NHWC.
NCHW = (0, 3, 1, 2)
NHWC = (0, 1, 2, 3)

class Unsupported(Exception):
    """A node this importer cannot express in Keras; an error only if the feature map needs it."""


class Tensor:
    """A Keras tensor (NHWC) and how the ONNX graph sees its axes."""

    def __init__(self, value, perm):
        self.value = value
        self.perm = tuple(perm)

    @property
    def spatial(self):
        return tuple(self.value.shape[1:3])


def node_attributes(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def keras_layout(constant, perm):
    """An ONNX constant broadcast against a 4-D tensor, rearranged to the Keras tensor's axes."""
    constant = np.asarray(constant, dtype="float32")
    if constant.ndim > 4:
        raise Unsupported(f"a constant of shape {constant.shape} (rank above 4)")
    constant = constant.reshape((1,) * (4 - constant.ndim) + constant.shape)
    return np.transpose(constant, np.argsort(perm))


def per_channel(constant, channels):
    """A constant in Keras layout as one value per channel, or an error for other shapes."""
    if constant.shape[:3] != (1, 1, 1) or constant.shape[3] not in (1, channels):
        raise Unsupported(f"a constant of shape {constant.shape} (only scalars or one per channel)")
    return np.broadcast_to(constant[0, 0, 0], (channels,)).astype("float32")


# === Converters ===


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
        raise Unsupported(f"negative pads {pads}")
    if not any(p for pair in pads for p in pair):
        return value
    return keras.layers.ZeroPadding2D(pads, name=importer.layer_name(node, "_pad"))(value)


def _conv(importer, node, inputs, attributes):
    x, kernel, bias = (inputs + [None])[:3]
    if not isinstance(kernel, np.ndarray) or (bias is not None and not isinstance(bias, np.ndarray)):
        raise Unsupported("weights that are not constants")
    if kernel.ndim != 4:
        raise Unsupported(f"a {kernel.ndim - 2}-D convolution (only 2-D)")
    x = importer.with_perm(x, NCHW, node)
    out_channels, group_channels, kh, kw = kernel.shape
    strides = tuple(attributes.get("strides", (1, 1)))
    dilations = tuple(attributes.get("dilations", (1, 1)))
    groups = attributes.get("group", 1)
    in_channels = x.value.shape[-1]
    if group_channels * groups != in_channels:
        raise Unsupported(f"weights {kernel.shape} that do not fit {in_channels} input channels")
    if max(strides) > 1 and max(dilations) > 1:
        raise Unsupported(f"strides {strides} together with dilations {dilations}")
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
    return [Tensor(value, NCHW)]


def _batch_normalization(importer, node, inputs, attributes):
    x, *statistics = inputs
    if len(statistics) != 4 or not all(isinstance(s, np.ndarray) for s in statistics):
        raise Unsupported("statistics that are not constants")
    x = importer.with_perm(x, NCHW, node)
    name = importer.layer_name(node)
    value = common.batch_norm(x.value, name, epsilon=attributes.get("epsilon", 1e-5))
    importer.weights[name] = statistics  # ONNX order: scale, bias, mean, var, as Keras keeps them
    return [Tensor(value, NCHW)]


def _prelu(importer, node, inputs, attributes):
    x, slope = inputs
    if not isinstance(slope, np.ndarray):
        raise Unsupported("a slope that is not a constant")
    return [_prelu_layer(importer, node, x, slope)]


def _prelu_layer(importer, node, x, slope):
    alpha = per_channel(keras_layout(slope, x.perm), x.value.shape[-1])
    name = importer.layer_name(node)
    value = common.prelu(x.value, name)
    importer.weights[name] = [alpha.reshape(1, 1, -1)]
    return Tensor(value, x.perm)


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
        raise Unsupported("bounds that are not constants")
    low = float(low) if low is not None else attributes.get("min")
    high = float(high) if high is not None else attributes.get("max")
    if low == 0.0:
        value = keras.layers.ReLU(max_value=high, name=importer.layer_name(node))(x.value)
        return [Tensor(value, x.perm)]
    if low is None or high is None:
        raise Unsupported(f"a one-sided clip to [{low}, {high}] other than ReLU")
    # clip(x, low, high) = low + relu6-style clip of (x - low) to [0, high - low].
    value = keras.layers.Rescaling(1.0, offset=-low, name=importer.layer_name(node, "_shift"))(x.value)
    value = keras.layers.ReLU(max_value=high - low, name=importer.layer_name(node))(value)
    value = keras.layers.Rescaling(1.0, offset=low, name=importer.layer_name(node, "_unshift"))(value)
    return [Tensor(value, x.perm)]


def _affine(importer, node, x, scale, offset):
    """x * scale + offset with constants of one value overall or per channel."""
    scale, offset = keras_layout(scale, x.perm), keras_layout(offset, x.perm)
    if scale.size == 1 and offset.size == 1:
        layer = keras.layers.Rescaling(float(scale.flat[0]), offset=float(offset.flat[0]), name=importer.layer_name(node))
        return Tensor(layer(x.value), x.perm)
    channels = x.value.shape[-1]
    scale, offset = per_channel(scale, channels), per_channel(offset, channels)
    # A 1x1 depthwise conv is the standard Keras layer for a per-channel scale and shift.
    layer = keras.layers.DepthwiseConv2D(1, name=importer.layer_name(node))
    value = layer(x.value)
    importer.weights[layer.name] = [scale.reshape(1, 1, channels, 1), offset]
    return Tensor(value, x.perm)


_MERGE_LAYERS = {"Add": keras.layers.Add, "Sub": keras.layers.Subtract, "Mul": keras.layers.Multiply}


def _binary(importer, node, inputs, attributes):
    a, b = inputs
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if node.op_type not in _MERGE_LAYERS:
            raise Unsupported("two tensor operands")
        prelu = _decomposed_prelu(importer, node) if node.op_type == "Add" else None
        if prelu is not None:
            try:  # one PReLU layer, as in the Keras model tf2onnx started from
                return [_prelu_layer(importer, node, *prelu)]
            except Unsupported:
                pass  # a slope that is not per channel: keep the ops as they are
        b = importer.with_perm(b, a.perm, node)
        value = _MERGE_LAYERS[node.op_type](name=importer.layer_name(node))([a.value, b.value])
        return [Tensor(value, a.perm)]
    x, c, tensor_first = (a, b, True) if isinstance(a, Tensor) else (b, a, False)
    c = np.asarray(c, dtype="float32")
    one, zero = np.float32(1), np.float32(0)
    scale, offset = {
        "Add": (one, c),
        "Sub": (one, -c) if tensor_first else (-one, c),
        "Mul": (c, zero),
        "Div": (one / c, zero) if tensor_first else (None, None),
    }[node.op_type]
    if scale is None:
        raise Unsupported("a constant divided by a tensor")
    return [_affine(importer, node, x, scale, offset)]


def _neg(importer, node, inputs, attributes):
    return [_affine(importer, node, inputs[0], np.float32(-1), np.float32(0))]


def _activation(keras_name):
    def convert(importer, node, inputs, attributes):
        x = inputs[0]
        value = keras.layers.Activation(keras_name, name=importer.layer_name(node))(x.value)
        return [Tensor(value, x.perm)]

    return convert


def _global_average_pool(importer, node, inputs, attributes):
    x = importer.with_perm(inputs[0], NCHW, node)
    value = keras.layers.GlobalAveragePooling2D(keepdims=True, name=importer.layer_name(node))(x.value)
    return [Tensor(value, NCHW)]


def _max_pool(importer, node, inputs, attributes):
    x = importer.with_perm(inputs[0], NCHW, node)
    kernel = tuple(attributes["kernel_shape"])
    strides = tuple(attributes.get("strides", (1, 1)))
    if attributes.get("ceil_mode", 0) or max(attributes.get("dilations", (1, 1))) > 1:
        raise Unsupported("ceil_mode or dilations")
    if len(node.output) > 1:
        raise Unsupported("the Indices output")
    # Zero padding would change a max over negative values, so only unpadded pooling maps.
    if any(p for pair in _explicit_pads(attributes, x, kernel, strides, (1, 1)) for p in pair):
        raise Unsupported("padding (ONNX pads a max pool with -inf; Keras cannot here)")
    value = keras.layers.MaxPooling2D(kernel, strides, name=importer.layer_name(node))(x.value)
    return [Tensor(value, NCHW)]


def _pad_node(importer, node, inputs, attributes):
    x, pads, constant = (inputs + [None, None])[:3]
    pads = attributes.get("pads") if pads is None else pads  # an attribute before opset 11
    constant = attributes.get("value", 0.0) if constant is None else constant
    mode = attributes.get("mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant" or np.any(constant):
        raise Unsupported(f"padding mode {mode!r} or a non-zero pad value (only zeros)")
    if len(inputs) > 3 and inputs[3] is not None:
        raise Unsupported("the `axes` input")
    pads = [int(p) for p in np.asarray(pads).ravel()]
    begin, end = pads[:4], pads[4:]
    keras_begin, keras_end = [0] * 4, [0] * 4
    for onnx_axis, keras_axis in enumerate(x.perm):
        keras_begin[keras_axis], keras_end[keras_axis] = begin[onnx_axis], end[onnx_axis]
    if keras_begin[0] or keras_end[0] or keras_begin[3] or keras_end[3]:
        raise Unsupported(f"padding outside the spatial axes (pads {pads})")
    padded = _zero_pad(importer, node, x.value, tuple(zip(keras_begin[1:3], keras_end[1:3])))
    return [Tensor(padded, x.perm)]


def _reshape(importer, node, inputs, attributes):
    """Only reshapes that move size-1 axes ([N, C, 1, 1] <-> [N, 1, 1, C]): a new view, no layer."""
    x, shape = inputs
    if not isinstance(shape, np.ndarray) or x.perm[0] != 0:
        raise Unsupported("a shape that is not a constant, or a moved batch axis")
    onnx_shape = [x.value.shape[axis] for axis in x.perm]
    target = [onnx_shape[i] if d == 0 and not attributes.get("allowzero", 0) else int(d) for i, d in enumerate(shape)]
    if len(target) != 4 or target[1:].count(-1) > 1 or min(target[1:]) < -1:
        raise Unsupported(f"a reshape to {shape.tolist()} (only 4-D with the batch first)")
    if -1 in target[1:]:  # the one inferred size, as the batch keeps its place
        known = math.prod(d for d in target[1:] if d != -1)
        target[target.index(-1, 1)] = math.prod(onnx_shape[1:]) // known
    sources = [i for i in (1, 2, 3) if onnx_shape[i] != 1]
    destinations = [i for i in (1, 2, 3) if target[i] != 1]
    if [onnx_shape[i] for i in sources] != [target[i] for i in destinations]:
        raise Unsupported(f"a reshape from {onnx_shape} to {target} that moves data")
    perm = [0, None, None, None]
    for source, destination in zip(sources, destinations):
        perm[destination] = x.perm[source]
    unit_axes = sorted({1, 2, 3} - set(perm))  # Keras axes of size 1, in order
    for destination in (i for i in (1, 2, 3) if perm[i] is None):
        perm[destination] = unit_axes.pop(0)
    return [Tensor(x.value, perm)]


def _identity(importer, node, inputs, attributes):
    return [inputs[0]]


def _transpose(importer, node, inputs, attributes):
    x = inputs[0]
    perm = attributes.get("perm", tuple(reversed(range(len(x.perm)))))
    return [Tensor(x.value, tuple(x.perm[i] for i in perm))]


BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div"})  # either operand may be the image-derived one

CONVERTERS = {
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
