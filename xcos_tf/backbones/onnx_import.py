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
import pathlib
import re

import keras
import numpy as np
import onnx
from onnx import numpy_helper

from xcos_tf.backbones import common
from xcos_tf.backbones.onnx_ops import BINARY_OPS, CONVERTERS, NCHW, NHWC, Tensor, Unsupported, node_attributes

# Ops that end the convolutional body (the embedding head starts there): the automatic
# feature map search stops quietly at them, while any other unsupported op on a spatial
# tensor is an error rather than a silently shorter backbone.
HEAD_OPS = frozenset({"Flatten", "Reshape", "Gemm", "MatMul", "Squeeze", "Shape"})


def read_onnx_model(path):
    """The `onnx.ModelProto` at `path`; FileNotFoundError / ValueError (one line) if it is not one."""
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


class _Importer:
    """Walks the ONNX graph in order and builds the Keras layers of every node it can."""

    def __init__(self, graph, input_perm, pixels):
        self.constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.tensors = {graph_input_name(graph): Tensor(pixels, input_perm)}
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
            return Tensor(tensor.value, perm)
        if axes[0] != 0:
            raise Unsupported(f"a transpose of the batch axis (perm {tensor.perm})")
        permute = keras.layers.Permute(tuple(int(a) for a in axes[1:]), name=self.layer_name(node, "_permute"))
        value = permute(tensor.value)
        return Tensor(value, perm)

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
                if any(isinstance(i, Tensor) and min(i.spatial) > 1 for i in inputs):
                    # A branch that did not import rejoins the spatial body (e.g. an SE gate).
                    self.rejoined.append(blocked)
                self.block(node, blocked)
                continue
            try:
                outputs = self.convert(node, inputs)
            except Unsupported as error:
                reason = f"{node.op_type} node {node.name!r}: {error}"
                self.root_blockers.append((node, reason, inputs))
                self.block(node, reason)
                continue
            for name, value in zip(node.output, outputs):
                if isinstance(value, Tensor):
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
            (value,) = node_attributes(node).values()  # `value`, or `value_float(s)`/`value_int(s)`
            return [numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)]
        converter = CONVERTERS.get(node.op_type)
        if converter is None:
            raise Unsupported("unsupported op")
        # The image-derived operand comes first, except for binary ops, where either may be it.
        operands = inputs[:2] if node.op_type in BINARY_OPS else inputs[:1]
        if not any(isinstance(i, Tensor) for i in operands):
            raise Unsupported("computes a constant (constant folding is not supported)")
        return converter(self, node, inputs, node_attributes(node))


def graph_input_name(graph):
    """The name of the graph's one image input (not an initializer)."""
    initializers = {t.name for t in graph.initializer}
    names = [i.name for i in graph.input if i.name not in initializers]
    if len(names) != 1:
        raise ValueError(f"from_onnx expects a graph with one image input. Received inputs: {names}")
    return names[0]


def _input_layout(graph, input_shape):
    """NCHW (e.g. from PyTorch) or NHWC (e.g. from tf2onnx), read off the 3-channel axis."""
    graph_input = next(i for i in graph.input if i.name == graph_input_name(graph))
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
        if node.op_type not in HEAD_OPS and any(isinstance(i, Tensor) and min(i.spatial) > 1 for i in inputs)
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


def import_feature_map(graph, feature_map, input_shape, pixels):
    """Walks `graph` from the Keras tensor `pixels` (the scaled image) and cuts it at its feature map.

    The one walk and choice of feature map that `from_onnx` and `read_linear_tail` share, so the
    tail starts exactly where the body ends.

    Returns:
        (ONNX tensor name of the map, its `Tensor` (Keras value and perm: ONNX axis i is Keras
        axis perm[i]), {layer name: ONNX weights in Keras layout} to set once the model exists).
    """
    importer = _Importer(graph, _input_layout(graph, input_shape), pixels)
    importer.run(graph)
    name = _feature_map_name(importer, graph, feature_map)
    return name, importer.tensors[name], importer.weights


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
    onnx_model = read_onnx_model(path)
    graph = onnx_model.graph
    name = name or _keras_safe(pathlib.Path(path).stem) or "onnx_backbone"
    input_shape = common.check_input_shape(input_shape, name)
    image, pixels = common.pixel_input(input_shape, scale=pixel_scale, offset=-pixel_mean * pixel_scale)
    _, features, weights = import_feature_map(graph, feature_map, input_shape, pixels)
    backbone = keras.Model(image, features.value, name=name)
    for layer in backbone.layers:
        if layer.name in weights:
            layer.set_weights(weights[layer.name])
    return backbone
