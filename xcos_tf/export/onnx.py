"""ONNX graphs of an exported SavedModel: one file per signature (ONNX has one graph per file),
their weights in one shared external-data file."""
import hashlib
import os

import tensorflow as tf

from xcos_tf.export.manifest import ONNX_OPSET

# Initializers smaller than this stay inside their graph (shapes, axes, small biases).
SHARED_MIN_BYTES = 1024


def convert_onnx(saved_model_dir, signature, path, opset=ONNX_OPSET):
    """One SavedModel signature as an ONNX graph with named inputs/outputs and a `batch` dim."""
    import tf2onnx

    saved_model = tf.saved_model.load(saved_model_dir)  # must outlive the conversion: it owns the variables
    function = saved_model.signatures[signature]
    input_specs = [function.structured_input_signature[1][name] for name in sorted(function.structured_input_signature[1])]
    names = [spec.name for spec in input_specs]

    # tf2onnx names the graph's inputs after the specs and its outputs after the dict keys.
    @tf.function(input_signature=input_specs, autograph=False)
    def by_name(*tensors):
        return function(**dict(zip(names, tensors)))

    onnx_model, _ = tf2onnx.convert.from_function(by_name, input_signature=input_specs, opset=opset)
    for value in list(onnx_model.graph.input) + list(onnx_model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    with open(path, "wb") as f:
        f.write(onnx_model.SerializeToString())


def share_weights(paths, weights_path):
    """Moves the large initializers of the ONNX files `paths` into one external-data file
    `weights_path` (beside them), each distinct tensor stored once.

    verify and embed run the same body and grid head, and decompose the same body again when
    the xCos body is the teacher's: as separate files each held its own copy (a real-size export
    had 17 MB per file). onnxruntime and `onnx.load` read the shared file by its relative name.

    Returns (bytes written, bytes the files would have held without sharing).
    """
    import onnx
    from onnx import external_data_helper

    location = os.path.basename(weights_path)
    stored, total = {}, 0
    with open(weights_path, "wb") as weights:
        for path in paths:
            model = onnx.load(path)
            for tensor in model.graph.initializer:
                if not tensor.HasField("raw_data") or len(tensor.raw_data) < SHARED_MIN_BYTES:
                    continue
                data = tensor.raw_data
                total += len(data)
                key = hashlib.sha256(data).digest()
                if key not in stored:
                    stored[key] = weights.tell()
                    weights.write(data)
                external_data_helper.set_external_data(tensor, location, offset=stored[key], length=len(data))
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
            with open(path, "wb") as f:
                f.write(model.SerializeToString())
        return weights.tell(), total
