"""Check a TF Serving REST request against a SavedModel's signatures, then run it locally.

    python tools/check_serving_request.py exported/default/tf_serving_request.json --model exported/default
    python tools/check_serving_request.py REQUEST.json --model exported/default --grpc localhost:8500 [--model_name xcos]

`--model` is a SavedModel folder (with saved_model.pb) or an export folder (its manifest names the
SavedModel). The request is TF Serving's predict body: row form `{"signature_name": ...,
"instances": [{input: value, ...}, ...]}` or columnar form `{"signature_name": ..., "inputs":
{input: batched value, ...}}` (`signature_name` defaults to `serving_default`; with a
one-input signature, instances and inputs may be bare values). Checked: the signature exists,
the input names are exactly the signature's, every value is a rectangular array of numbers that
fits the input's dtype (integers in range, finite floats) and its shape matches the signature's.
Then the request runs through `tf.saved_model.load` and the outputs are printed as TF Serving
would answer (`predictions` for the row form, `outputs` for the columnar form).

With `--grpc HOST:PORT` the checked request goes to a running TF Serving instead, as
tensorflow-serving-api's `PredictRequest` (`pip install tensorflow-serving-api`, same version as
tensorflow), and its answer is printed the same way.

Bad input: one line on stderr, exit code 2. The check needs no server: run it before deploying.
"""
import json
import os
import pathlib
import sys
import types

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from absl import flags  # noqa: E402

from xcos_tf import cli  # noqa: E402

DEFAULT_SIGNATURE = "serving_default"


class RequestError(ValueError):
    """A request that TF Serving would refuse or answer wrongly for this model."""


def define_flags(flag_values=flags.FLAGS):
    """The command-line flags, defined only when this file runs as the program."""
    return types.SimpleNamespace(
        model=cli.define_model("A SavedModel folder (with saved_model.pb), or an export folder whose manifest "
                               "names one.", flag_values=flag_values),
        grpc=flags.DEFINE_string("grpc", None, "HOST:PORT of a running TF Serving: send the checked request there "
                                 "(gRPC) instead of running it locally.", flag_values=flag_values),
        model_name=flags.DEFINE_string("model_name", "xcos", "With --grpc: the model's name in TF Serving.",
                                       flag_values=flag_values),
    )


def read_request(path):
    """(signature name, {input name or None: batched value}, "row" or "columnar") of a request file."""
    try:
        with open(path) as f:
            request = json.load(f)
    except OSError as err:
        raise RequestError(f"{path}: cannot read ({err.strerror or err})") from None
    except ValueError as err:
        raise RequestError(f"{path}: not JSON ({err})") from None
    if not isinstance(request, dict) or ("instances" in request) == ("inputs" in request):
        raise RequestError(f"{path}: a predict request has exactly one of `instances` (row form) or `inputs` (columnar)")
    signature = request.get("signature_name", DEFAULT_SIGNATURE)
    if "inputs" in request:
        inputs = request["inputs"]
        return signature, (inputs if isinstance(inputs, dict) else {None: inputs}), "columnar"
    instances = request["instances"]
    if not isinstance(instances, list) or not instances:
        raise RequestError(f"{path}: `instances` must be a non-empty list")
    if not all(isinstance(instance, dict) for instance in instances):
        if any(isinstance(instance, dict) for instance in instances):
            raise RequestError(f"{path}: mixed instances: all must be objects {{input: value}}, or all bare values")
        return signature, {None: instances}, "row"
    names = set(instances[0])
    for number, instance in enumerate(instances):
        if set(instance) != names:
            raise RequestError(f"{path}: instance {number} has inputs {sorted(instance)}, instance 0 has {sorted(names)}")
    return signature, {name: [instance[name] for instance in instances] for name in sorted(names)}, "row"


def as_array(name, value, spec):
    """The value as a numpy array of the input's dtype and shape; `RequestError` naming the input."""
    dtype = spec.dtype.as_numpy_dtype
    try:
        array = np.asarray(value, dtype=np.float64 if np.issubdtype(dtype, np.number) else object)
    except (ValueError, TypeError):
        raise RequestError(f"input `{name}`: not a rectangular array of numbers (ragged lists or strings)") from None
    if array.dtype == object:
        raise RequestError(f"input `{name}`: dtype {spec.dtype.name} is not checked by this tool")
    if not np.isfinite(array).all():
        raise RequestError(f"input `{name}`: NaN or infinite values")
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if (array != np.round(array)).any() or array.min() < info.min or array.max() > info.max:
            raise RequestError(f"input `{name}`: values must be integers in {info.min}..{info.max} ({spec.dtype.name}); "
                               f"received [{array.min():g}, {array.max():g}]")
    if not spec.shape.is_compatible_with(array.shape):
        raise RequestError(f"input `{name}`: shape {list(array.shape)} does not match the signature's "
                           f"{spec.shape.as_list()} ({spec.dtype.name})")
    return array.astype(dtype)


def match_signature(values, input_specs, signature):
    """{input name: array} checked against the signature's {name: TensorSpec}."""
    if None in values:  # bare values: only for a one-input signature
        if len(input_specs) != 1:
            raise RequestError(f"signature `{signature}` has inputs {sorted(input_specs)}: name them in the request")
        values = {next(iter(input_specs)): values[None]}
    missing, extra = sorted(set(input_specs) - set(values)), sorted(set(values) - set(input_specs))
    if missing or extra:
        raise RequestError(f"signature `{signature}` takes inputs {sorted(input_specs)}; the request "
                           f"{'lacks ' + ', '.join(missing) if missing else ''}"
                           f"{'; ' if missing and extra else ''}{'has unknown ' + ', '.join(extra) if extra else ''}")
    return {name: as_array(name, values[name], input_specs[name]) for name in sorted(values)}


def saved_model_path(model):
    """The SavedModel folder of `--model`: itself, or the one an export's manifest names."""
    if os.path.isfile(os.path.join(model, "saved_model.pb")):
        return model
    manifest_path = os.path.join(model, "manifest.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            entry = json.load(f).get("formats", {}).get("saved_model")
        if entry and os.path.isfile(os.path.join(model, entry["path"], "saved_model.pb")):
            return os.path.join(model, entry["path"])
    raise RequestError(f"--model {model}: neither a SavedModel folder (saved_model.pb) nor an export with one")


def response(outputs, form):
    """TF Serving's answer: row form `{"predictions": [{output: value}, ...]}`, else `{"outputs": {...}}`."""
    rounded = {name: np.round(np.asarray(value, np.float64), 6) for name, value in outputs.items()}
    if form == "columnar":
        return {"outputs": {name: value.tolist() for name, value in rounded.items()}}
    count = len(next(iter(rounded.values())))
    return {"predictions": [{name: value[i].tolist() for name, value in rounded.items()} for i in range(count)]}


def grpc_predict(target, model_name, signature, arrays, timeout=60.0):
    """Sends the checked inputs to a running TF Serving as a gRPC `PredictRequest`; its outputs as numpy."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    for name, array in arrays.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
    with grpc.insecure_channel(target) as channel:
        reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=timeout)
    return {name: tf.make_ndarray(proto) for name, proto in reply.outputs.items()}


def main(argv, args):
    if len(argv) != 2:
        raise cli.UserError("expected one request file: python tools/check_serving_request.py REQUEST.json "
                            f"--model SAVED_MODEL_OR_EXPORT_DIR. Received: {argv[1:]}")
    try:
        signature, values, form = read_request(argv[1])
        path = saved_model_path(args.model.value)
    except RequestError as err:
        raise cli.UserError(str(err)) from None
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(path)
    except Exception as err:  # a damaged folder: any engine error
        raise cli.UserError(f"--model {args.model.value}: not a loadable SavedModel ({type(err).__name__})") from None
    if signature not in loaded.signatures:
        raise cli.UserError(f"the request names signature `{signature}`; {path} has: "
                            f"{', '.join(sorted(loaded.signatures))}")
    function = loaded.signatures[signature]
    try:
        arrays = match_signature(values, function.structured_input_signature[1], signature)
    except RequestError as err:
        raise cli.UserError(str(err)) from None
    shapes = ", ".join(f"{name} {array.dtype.name} {list(array.shape)}" for name, array in arrays.items())
    where = f"TF Serving at {args.grpc.value} (gRPC)" if args.grpc.value else "the local SavedModel"
    print(f"ok: the request matches signature `{signature}` ({shapes}); running it on {where}", file=sys.stderr)
    if args.grpc.value:
        import grpc

        try:
            outputs = grpc_predict(args.grpc.value, args.model_name.value, signature, arrays)
        except grpc.RpcError as err:
            details = (err.details() or "").splitlines()
            raise cli.UserError(f"--grpc {args.grpc.value}: {err.code().name}: "
                                f"{details[0] if details else 'no details'}") from None
    else:
        outputs = {name: value.numpy() for name, value in
                   function(**{name: tf.constant(array) for name, array in arrays.items()}).items()}
    print(json.dumps(response(outputs, form)))


if __name__ == "__main__":
    _ARGS = define_flags()
    flags.mark_flag_as_required("model")
    cli.run(lambda argv: main(argv, _ARGS))
