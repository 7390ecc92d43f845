"""ONNX graphs of an exported SavedModel: one file per signature (ONNX has one graph per file)."""
import tensorflow as tf

from xcos_tf.export.manifest import ONNX_OPSET


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
