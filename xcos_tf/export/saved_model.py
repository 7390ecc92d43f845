"""The SavedModel of a Verifier in the TF Serving layout, and TF Serving's config and sample request."""
import keras
import numpy as np
import tensorflow as tf

from xcos_tf.export.manifest import signature_specs

SERVING_MOUNT = "/models"  # where `docker run -v DIR:/models/NAME` puts the folder


def _tensor_specs(inputs, dtype=None):
    return [tf.TensorSpec(spec["shape"], dtype or spec["dtype"], name=name) for name, spec in inputs.items()]


def _shaped(**tensors):
    """The inputs with their signature shapes asserted before any op runs on them. A signature's
    placeholder shape is not checked when it is called: a rank-2 image reached oneDNN's conv,
    which aborted the whole process (issue 16); `ensure_shape` raises InvalidArgumentError."""
    return {name: tf.ensure_shape(tensor, tensor.shape) for name, tensor in tensors.items()}


def build_archive(verifier, decomposer=None):
    """A `keras.export.ExportArchive` with the signatures verify (= serving_default),
    verify_uint8, embed and compare, all with a dynamic batch, and decompose when a
    `decomposer` (the teacher's `decomposition_model`) is given."""
    specs = signature_specs(verifier, decomposer is not None)
    # No archive.track(model): add_endpoint already saves the variables the endpoints use (as
    # `_all_variables`); tracking the models saved each weight a second time under `variables`
    # (a real-size export's variables file was 59 MB for 30 MB of weights).
    archive = keras.export.ExportArchive()

    @tf.function(input_signature=_tensor_specs(specs["verify"]["inputs"]))
    def verify(image_a, image_b):
        return verifier.verify(_shaped(image_a=image_a, image_b=image_b), training=False)

    @tf.function(input_signature=_tensor_specs(specs["verify"]["inputs"], tf.uint8))
    def verify_uint8(image_a, image_b):
        images = _shaped(image_a=image_a, image_b=image_b)
        return verifier.verify({name: tf.cast(image, tf.float32) for name, image in images.items()}, training=False)

    @tf.function(input_signature=_tensor_specs(specs["embed"]["inputs"]))
    def embed(image):
        return verifier.embed(_shaped(image=image), training=False)

    @tf.function(input_signature=_tensor_specs(specs["compare"]["inputs"]))
    def compare(grid_a, grid_b):
        return verifier.compare(_shaped(grid_a=grid_a, grid_b=grid_b), training=False)

    endpoints = [
        ("serving_default", verify), ("verify", verify), ("verify_uint8", verify_uint8),
        ("embed", embed), ("compare", compare),
    ]
    if decomposer is not None:

        @tf.function(input_signature=_tensor_specs(specs["decompose"]["inputs"]))
        def decompose(image_a, image_b):
            return decomposer(_shaped(image_a=image_a, image_b=image_b), training=False)

        endpoints.append(("decompose", decompose))
    for name, function in endpoints:
        archive.add_endpoint(name, function)
    return archive


def write_saved_model(verifier, path, decomposer=None):
    build_archive(verifier, decomposer).write_out(path, verbose=False)


def models_config(name):
    """TF Serving's model config for the folder mounted at /models/NAME."""
    return (
        "model_config_list {\n  config {\n"
        f'    name: "{name}"\n'
        f'    base_path: "{SERVING_MOUNT}/{name}/saved_model/{name}"\n'
        '    model_platform: "tensorflow"\n'
        "  }\n}\n"
    )


def tf_serving_request(face_a, face_b):
    """A REST `:predict` request (row format) for `verify` on one pair of uint8 faces."""
    return {
        "signature_name": "verify",
        "instances": [{"image_a": np.asarray(face_a).tolist(), "image_b": np.asarray(face_b).tolist()}],
    }
