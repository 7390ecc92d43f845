"""TFLite flatbuffers of an exported SavedModel: float32, float16 weights, and int8 (backbone and
grid head int8, the xCos head in float32: see manifest.INT8_NOTE)."""
import re
import warnings

import keras
import numpy as np
import tensorflow as tf

from xcos_tf import layers
from xcos_tf.export.manifest import SIGNATURES


def quantisable_layer_names(verifier):
    """The backbone and a 1x1-conv GridHead: the layers that int8 TFLite quantises.

    A PositionwiseGridHead stays float32. Measured on a real-size model (teacher MobileFaceNet
    body, 49x512x128 head from its tail, context 0.2, attention prior; calibrated on 300
    glint_sample faces; 50 glint_sample pairs; docs/export.md): score error against float
    mean 0.040 / max 0.110 with body and head int8, 0.036 / 0.084 with only the head int8,
    0.014 / 0.047 with only the body int8. Keeping the cells' stack, context and reshape in
    float did not help (0.040 / 0.107): it is the per-cell int8 matmuls themselves. The float
    head costs 9.2 MB in the int8 file (5.5 -> 14.7 MB).
    """
    return [layer.name for layer in verifier.embed.layers if isinstance(layer, (keras.Model, layers.GridHead))]


def representative_dataset(verifier, faces):
    """Calibration samples for every signature: pairs of neighbouring faces, one at a time."""
    grids = verifier.embed.predict({"image": faces.astype(np.float32)}, batch_size=32, verbose=0)["grid"]

    def generate():
        for i in range(0, len(faces) - 1, 2):
            image_a = faces[i : i + 1].astype(np.float32)
            image_b = faces[i + 1 : i + 2].astype(np.float32)
            yield "verify", {"image_a": image_a, "image_b": image_b}
            yield "embed", {"image": image_a}
            yield "compare", {"grid_a": grids[i : i + 1], "grid_b": grids[i + 1 : i + 2]}

    return generate


def _model_ops(model_bytes):
    """(subgraph, op name, output tensor names, output is float32) of each op of a TFLite model."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    op_names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    tflite_model = flatbuffer_utils.convert_bytearray_to_object(bytearray(model_bytes))
    for subgraph in tflite_model.subgraphs:
        for op in subgraph.operators:
            code = tflite_model.operatorCodes[op.opcodeIndex]
            outputs = [subgraph.tensors[i] for i in op.outputs]
            yield (
                subgraph.name.decode(),
                op_names[max(code.builtinCode, code.deprecatedBuiltinCode)],
                [tensor.name.decode() for tensor in outputs],
                all(tensor.type == schema.TensorType.FLOAT32 for tensor in outputs),
            )


def int8_op_summary(model_bytes):
    """Which op types of a quantised model compute in float32, and how many ops are int8."""
    float_ops, int8_count = set(), 0
    for _, op_name, _, is_float in _model_ops(model_bytes):
        if op_name in ("QUANTIZE", "DEQUANTIZE"):
            continue
        if is_float:
            float_ops.add(op_name)
        else:
            int8_count += 1
    return {"int8_ops": int8_count, "float32_op_types": sorted(float_ops)}


def convert_tflite(saved_model_dir, quantization="float32", representative_dataset=None, int8_layers=()):
    """TFLite flatbuffer (bytes) with the verify, embed and compare signatures of a SavedModel.

    Args:
        quantization: `"float32"`, `"float16"` (float16 weights) or `"int8"` (int8 weights and
            activations in the layers named `int8_layers`, float32 elsewhere and at the IO).
        representative_dataset: for int8, a generator function of (signature, inputs) samples.
        int8_layers: for int8, names of the Keras layers to quantise (backbone and grid head).
    """
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, signature_keys=list(SIGNATURES))
    if quantization == "float32":
        return converter.convert()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
        return converter.convert()
    if quantization != "int8":
        raise ValueError(f"`quantization` must be float32, float16 or int8. Received: {quantization!r}")
    if representative_dataset is None:
        raise ValueError("int8 quantisation needs a representative dataset of aligned faces.")
    converter.representative_dataset = representative_dataset
    # Calibrate, then quantise all but the ops outside `int8_layers` (see INT8_NOTE): what
    # tf.lite.experimental.QuantizationDebugger.get_nondebug_quantized_model does with
    # denylisted nodes, without building its debug model.
    from tensorflow.lite.python import convert

    converter._experimental_calibrate_only = True  # pylint: disable=protected-access
    with warnings.catch_warnings():
        # The calibrator runs tf.lite.Interpreter and warns of its deprecation: not ours to fix.
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        calibrated = converter.convert()
    keep = re.compile(r"(^|/)(%s)(_\d+)?/" % "|".join(re.escape(name) for name in int8_layers))
    float_nodes = [
        name
        for _, _, names, _ in _model_ops(calibrated)
        if not any(keep.search(name) for name in names)
        for name in names
    ]
    return convert.mlir_quantize(calibrated, denylisted_nodes=float_nodes)
