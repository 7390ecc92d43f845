"""Export an xCos model to a self-describing deployment folder.

`python -m xcos_tf.export --weights RUN_DIR_OR_KERAS --out DIR [--formats ...]`

DIR holds, for `--name xcos` and every format:

    saved_model/xcos/1/        SavedModel in the TF Serving layout (signatures verify = serving_default,
                               verify_uint8, embed, compare)
    models.config              TF Serving model config (DIR mounted at /models/xcos)
    tf_serving_request.json    a REST :predict request for `verify` on two sample faces
    xcos.tflite                TFLite float32 (signatures verify, embed, compare)
    xcos_fp16.tflite           TFLite with float16 weights
    xcos_int8.tflite           TFLite int8 backbone and grid head, float32 inputs and outputs
    xcos_verify.onnx, xcos_embed.onnx, xcos_compare.onnx   ONNX, one graph per signature
    manifest.json              versions, input spec, threshold, files and their sha256
    MODEL_CARD.md              when a model card is given

Every signature returns the score and both maps (or the embedding and grid), with a
dynamic batch. `xcos_tf.runtime.load(DIR, format=...)` runs any of them.

The folder is written into a temporary sibling and renamed into place only when complete:
a failed or killed export never leaves a half folder where a good one stood.
"""
import contextlib
import datetime
import glob
import importlib.metadata
import json
import logging as python_logging
import os
import platform
import re
import shutil
import sys
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags, logging

import xcos_tf
from xcos_tf import layers
from xcos_tf import model as xcos_model
from xcos_tf.data import align, records
from xcos_tf.runtime import FORMATS, MANIFEST_FILE
from xcos_tf.training import run_folder

SIGNATURES = ("verify", "embed", "compare")
ONNX_OPSET = 17
CALIBRATION_SIZE = 300
TFLITE_SUFFIXES = {"tflite": "", "tflite_fp16": "_fp16", "tflite_int8": "_int8"}
SERVING_MOUNT = "/models"  # where `docker run -v DIR:/models/NAME` puts the folder
# What int8 keeps in float32, and why (measured on a tiny model and real glint_sample faces):
# an int8 cosine divides by a quantised norm that rounds to zero (TFLite's DIV refuses to run);
# with only the division in float the cos map was off by up to 0.55; with the whole cosine in
# float but the attention convs and the softmax over 49 cells (~0.02 each, int8 step 1/256) in
# int8, the score was off by 0.017 against 0.0024 with the whole head in float. The head is
# about 1 M multiply-adds per pair against ~440 M for two MobileFaceNet passes, so it stays float.
INT8_NOTE = (
    "Backbone and grid head fully int8 (per-channel weights, int8 activations); the xCos head "
    "(cosine map, attention convs, softmax, score) and the embedding normalisation run in float32. "
    "Inputs and outputs are float32."
)


# === Sources ===


def resolve_verifier(source):
    """The `Verifier` of an XCosTrainer, a Verifier, a `.keras` file or a training run folder."""
    if isinstance(source, xcos_model.Verifier):
        return source
    if isinstance(source, xcos_model.XCosTrainer):
        return xcos_model.build_verifier(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, run_folder.PARAMS_FILE)):
                raise ValueError(f"{path!r} is a folder without params.json: not a training run (--model_dir).")
            return xcos_model.build_verifier(run_folder.load_trainer(path))
        if path.endswith(".keras"):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Model file not found: {path!r}")
            return xcos_model.build_verifier(path)
        raise ValueError(f"Expected a `.keras` file or a training run folder with params.json. Received: {path!r}")
    raise ValueError(
        f"Expected an XCosTrainer, a Verifier, a `.keras` path or a run folder. Received: {type(source).__name__}"
    )


def _xcos_layer(verifier):
    return next(layer for layer in verifier.compare.layers if isinstance(layer, layers.XCosLayer))


def _quantisable_layer_names(verifier):
    """The backbone and grid head: the layers that int8 TFLite quantises."""
    grid_heads = (layers.GridHead, layers.PositionwiseGridHead)
    return [layer.name for layer in verifier.embed.layers if isinstance(layer, (keras.Model, *grid_heads))]


def _specs(verifier):
    image_shape = tuple(verifier.embed.input["image"].shape[1:])
    grid_shape = tuple(verifier.embed.output["grid"].shape[1:])
    image = {"shape": [None, *image_shape], "dtype": "float32"}
    grid = {"shape": [None, *grid_shape], "dtype": "float32"}
    maps = {
        "score": {"shape": [None], "dtype": "float32"},
        "cos_map": {"shape": [None, *grid_shape[:2]], "dtype": "float32"},
        "attention_map": {"shape": [None, *grid_shape[:2]], "dtype": "float32"},
    }
    embedding = {"shape": [None, int(np.prod(grid_shape))], "dtype": "float32"}
    return {
        "verify": {"inputs": {"image_a": image, "image_b": image}, "outputs": maps},
        "embed": {"inputs": {"image": image}, "outputs": {"embedding": embedding, "grid": grid}},
        "compare": {"inputs": {"grid_a": grid, "grid_b": grid}, "outputs": maps},
    }


# === SavedModel ===


def _tensor_specs(inputs, dtype=None):
    return [tf.TensorSpec(spec["shape"], dtype or spec["dtype"], name=name) for name, spec in inputs.items()]


def build_archive(verifier):
    """A `keras.export.ExportArchive` with the signatures verify (= serving_default),
    verify_uint8, embed and compare, all with a dynamic batch."""
    specs = _specs(verifier)
    archive = keras.export.ExportArchive()
    for model in verifier:
        archive.track(model)

    @tf.function(input_signature=_tensor_specs(specs["verify"]["inputs"]))
    def verify(image_a, image_b):
        return verifier.verify({"image_a": image_a, "image_b": image_b}, training=False)

    @tf.function(input_signature=_tensor_specs(specs["verify"]["inputs"], tf.uint8))
    def verify_uint8(image_a, image_b):
        images = {"image_a": tf.cast(image_a, tf.float32), "image_b": tf.cast(image_b, tf.float32)}
        return verifier.verify(images, training=False)

    @tf.function(input_signature=_tensor_specs(specs["embed"]["inputs"]))
    def embed(image):
        return verifier.embed({"image": image}, training=False)

    @tf.function(input_signature=_tensor_specs(specs["compare"]["inputs"]))
    def compare(grid_a, grid_b):
        return verifier.compare({"grid_a": grid_a, "grid_b": grid_b}, training=False)

    for name, function in [
        ("serving_default", verify), ("verify", verify), ("verify_uint8", verify_uint8),
        ("embed", embed), ("compare", compare),
    ]:
        archive.add_endpoint(name, function)
    return archive


def write_saved_model(verifier, path):
    build_archive(verifier).write_out(path, verbose=False)


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


# === TFLite ===


def _representative_dataset(verifier, faces):
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


# === ONNX ===


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


# === Manifest ===


def _versions():
    versions = {"xcos_tf": xcos_tf.__version__, "python": platform.python_version()}
    for package in ("tensorflow", "keras", "numpy", "tf2onnx", "onnx", "onnxruntime", "ai-edge-litert"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def file_digests(root):
    """{relative path: {"sha256", "bytes"}} of every file under `root`."""
    digests = {}
    for folder, _, files in sorted(os.walk(root)):
        for file_name in sorted(files):
            path = os.path.join(folder, file_name)
            digests[os.path.relpath(path, root)] = {"sha256": records.sha256_file(path), "bytes": os.path.getsize(path)}
    return digests


def build_manifest(verifier, name, formats, threshold, far, calibration_count, int8_summary, sample_note):
    xcos = _xcos_layer(verifier)
    specs = _specs(verifier)
    image_shape = specs["embed"]["inputs"]["image"]["shape"][1:]
    grid_shape = specs["embed"]["outputs"]["grid"]["shape"][1:]
    files = {}
    if "saved_model" in formats:
        files["saved_model"] = {
            "path": f"saved_model/{name}/1",
            "signatures": {
                "verify": "verify", "embed": "embed", "compare": "compare",
                "serving_default": "verify", "verify_uint8": "verify with uint8 inputs",
            },
            "tf_serving": {"models_config": "models.config", "request": "tf_serving_request.json", "model_name": name},
        }
    for tflite_format, suffix in TFLITE_SUFFIXES.items():
        if tflite_format in formats:
            files[tflite_format] = {"path": f"{name}{suffix}.tflite", "signatures": list(SIGNATURES)}
    if "tflite_int8" in formats:
        files["tflite_int8"]["quantization"] = {
            "scheme": INT8_NOTE, "calibration_faces": calibration_count, **int8_summary
        }
    if "onnx" in formats:
        files["onnx"] = {
            "signatures": {signature: f"{name}_{signature}.onnx" for signature in SIGNATURES},
            "opset": ONNX_OPSET,
            "note": "ONNX has one graph per file: one file per signature.",
        }
    return {
        "name": name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "model": {
            "grid_shape": grid_shape,
            "embedding_size": int(np.prod(grid_shape)),
            "attention": xcos.attention,
            "symmetric": xcos.symmetric,
            "parameters": int(verifier.verify.count_params()),
        },
        "input": {
            "shape": [None, *image_shape],
            "dtype": "float32",
            "uint8": "the SavedModel's verify_uint8 signature; xcos_tf.runtime casts uint8 itself",
            "layout": "NHWC",
            "color": "RGB",
            "range": [0, 255],
            "alignment": "5-point similarity transform to the 112x112 ArcFace template (xcos_tf.data.align)",
        },
        "normalisation": "inside the model: pixels / 127.5 - 1; feed raw 0..255 pixels",
        "grid_size": grid_shape[:2],
        "threshold": None if threshold is None else float(threshold),
        "threshold_far": None if far is None else float(far),
        "sample_faces": sample_note,
        "signatures": specs,
        "formats": files,
    }


# === Writing the folder ===


@contextlib.contextmanager
def staged_folder(out_dir):
    """Yields a temporary sibling of `out_dir`; on success it replaces `out_dir`.

    On an exception the staging folder is removed and `out_dir` is left as it was. Between
    the two renames (microseconds) `out_dir` briefly does not exist; it never holds a half export.
    """
    out_dir = os.path.abspath(out_dir)
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{base}.partial-", dir=parent)
    os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the model from a TF Serving container's user
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = None
    if os.path.lexists(out_dir):
        previous = tempfile.mkdtemp(prefix=f".{base}.previous-", dir=parent)
        os.rename(out_dir, os.path.join(previous, base))
    os.rename(staging, out_dir)
    if previous:
        shutil.rmtree(previous, ignore_errors=True)


def _checked_faces(faces, what):
    faces = np.asarray(faces)
    if faces.dtype != np.uint8 or faces.ndim != 4 or faces.shape[1:] != (112, 112, 3):
        raise ValueError(
            f"`{what}` must be aligned faces, uint8 [N, 112, 112, 3]. Received: dtype={faces.dtype}, shape={faces.shape}"
        )
    return faces


def export_model(
    source,
    out_dir,
    formats=FORMATS,
    name="xcos",
    threshold=None,
    far=None,
    calibration_images=None,
    sample_faces=None,
    model_card=None,
):
    """Exports `source` to the deployment folder `out_dir` (replaced only once complete).

    Args:
        source: an `XCosTrainer`, a `Verifier`, a `.keras` file or a training run folder.
        out_dir: str, the folder to write (see the module docstring for its layout).
        formats: iterable of `FORMATS` entries.
        name: str, the model name: file names and the TF Serving model name.
        threshold: optional float, the decision threshold on the score.
        far: optional float, the false-accept rate at which `threshold` was chosen.
        calibration_images: uint8 [N, 112, 112, 3] aligned faces; required for `tflite_int8`
            (a few hundred real faces; consecutive faces are paired for `verify`).
        sample_faces: optional uint8 [2, 112, 112, 3], the pair in tf_serving_request.json
            (default: the first two calibration faces, else two grey images).
        model_card: optional path of a MODEL_CARD.md to copy in.

    Returns:
        The manifest (dict) written to `out_dir/manifest.json`.
    """
    formats = list(dict.fromkeys(formats))
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ValueError(f"Unknown or no formats {unknown}; valid: {', '.join(FORMATS)}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"`name` must be letters, digits, '_', '.' or '-'. Received: name={name!r}")
    if far is not None and threshold is None:
        raise ValueError("`far` describes a threshold: pass `threshold` too.")
    if calibration_images is not None:
        calibration_images = _checked_faces(calibration_images, "calibration_images")
    if "tflite_int8" in formats and (calibration_images is None or len(calibration_images) < 2):
        raise ValueError("tflite_int8 needs `calibration_images`: a few hundred aligned faces (--calibration_dir).")
    if sample_faces is not None:
        sample_faces, sample_note = _checked_faces(sample_faces, "sample_faces")[:2], "given"
    elif calibration_images is not None:
        sample_faces, sample_note = calibration_images[:2], "the first two calibration faces"
    else:
        sample_faces, sample_note = np.full((2, 112, 112, 3), 128, np.uint8), "grey placeholders (no faces given)"
    if model_card is not None and not os.path.isfile(model_card):
        raise FileNotFoundError(f"Model card not found: {model_card!r}")

    verifier = resolve_verifier(source)
    with staged_folder(out_dir) as staging, tempfile.TemporaryDirectory() as scratch:
        saved_model_dir = os.path.join(staging if "saved_model" in formats else scratch, "saved_model", name, "1")
        logging.info("Writing the SavedModel to %s", saved_model_dir)
        write_saved_model(verifier, saved_model_dir)
        if "saved_model" in formats:
            with open(os.path.join(staging, "models.config"), "w") as f:
                f.write(models_config(name))
            with open(os.path.join(staging, "tf_serving_request.json"), "w") as f:
                json.dump(tf_serving_request(*sample_faces[:2]), f, separators=(",", ":"))
        int8_summary = {}
        for tflite_format, suffix in TFLITE_SUFFIXES.items():
            if tflite_format not in formats:
                continue
            logging.info("Converting to %s", tflite_format)
            if tflite_format == "tflite_int8":
                model_bytes = convert_tflite(
                    saved_model_dir,
                    "int8",
                    _representative_dataset(verifier, calibration_images),
                    _quantisable_layer_names(verifier),
                )
                int8_summary = int8_op_summary(model_bytes)
            else:
                model_bytes = convert_tflite(saved_model_dir, "float16" if suffix else "float32")
            with open(os.path.join(staging, f"{name}{suffix}.tflite"), "wb") as f:
                f.write(model_bytes)
        if "onnx" in formats:
            for signature in SIGNATURES:
                logging.info("Converting %s to ONNX", signature)
                convert_onnx(saved_model_dir, signature, os.path.join(staging, f"{name}_{signature}.onnx"))
        if model_card:
            shutil.copyfile(model_card, os.path.join(staging, "MODEL_CARD.md"))
        calibration_count = 0 if calibration_images is None else len(calibration_images)
        manifest = build_manifest(verifier, name, formats, threshold, far, calibration_count, int8_summary, sample_note)
        manifest["files"] = file_digests(staging)
        with open(os.path.join(staging, MANIFEST_FILE), "w") as f:
            json.dump(manifest, f, indent=2)
    return manifest


def load_faces(folder, limit=CALIBRATION_SIZE):
    """Up to `limit` aligned 112x112 faces from the images under `folder`, spread evenly over
    the sorted file list (so over the people of an ImageFolder tree)."""
    paths = sorted(
        path
        for pattern in ("**/*.jpg", "**/*.jpeg", "**/*.png")
        for path in glob.glob(os.path.join(folder, pattern), recursive=True)
    )
    if not paths:
        raise FileNotFoundError(f"No .jpg/.jpeg/.png images under {folder!r}")
    chosen = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, min(limit, len(paths)))]
    faces = []
    for path in chosen:
        image = align.read_image(path)
        if not align.is_aligned_crop(image):
            raise ValueError(f"{path}: expected an aligned 112x112 face crop, got {image.shape[1]}x{image.shape[0]}")
        faces.append(image)
    return np.stack(faces)


# === Command line ===


def define_flags():
    """The CLI's flags, defined only when run as a script (train imports this module)."""
    return {
        "weights": flags.DEFINE_string("weights", None, "A trainer saved as `.keras`, or a training run folder (--model_dir)."),
        "out": flags.DEFINE_string("out", None, "The deployment folder to write (replaced once the new one is complete)."),
        "formats": flags.DEFINE_list("formats", list(FORMATS), f"Formats to write, from: {', '.join(FORMATS)}."),
        "name": flags.DEFINE_string("name", "xcos", "Model name: file names and the TF Serving model name."),
        "calibration_dir": flags.DEFINE_string(
            "calibration_dir", None, "Folder of aligned 112x112 faces for int8 calibration (and the sample request)."
        ),
        "calibration_size": flags.DEFINE_integer("calibration_size", CALIBRATION_SIZE, "How many calibration faces to use."),
        "sample_faces": flags.DEFINE_list("sample_faces", [], "Two aligned face images for tf_serving_request.json."),
        "threshold": flags.DEFINE_float("threshold", None, "Decision threshold on the score, recorded in the manifest."),
        "far": flags.DEFINE_float("far", None, "False-accept rate at which --threshold was chosen."),
        "model_card": flags.DEFINE_string("model_card", None, "A MODEL_CARD.md to copy into the folder."),
    }


def main(argv, args):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    values = {key: holder.value for key, holder in args.items()}
    # TensorFlow's own INFO lines (signature renames, saver timings) drown the export's progress.
    logging.get_absl_handler().addFilter(
        lambda record: record.levelno > python_logging.INFO or record.pathname == os.path.abspath(__file__)
    )
    try:
        calibration = None
        if values["calibration_dir"]:
            calibration = load_faces(values["calibration_dir"], values["calibration_size"])
        sample = None
        if values["sample_faces"]:
            if len(values["sample_faces"]) != 2:
                raise ValueError(f"--sample_faces takes two images. Received: {values['sample_faces']}")
            sample = np.stack([align.read_image(path) for path in values["sample_faces"]])
        manifest = export_model(
            values["weights"],
            values["out"],
            formats=values["formats"],
            name=values["name"],
            threshold=values["threshold"],
            far=values["far"],
            calibration_images=calibration,
            sample_faces=sample,
            model_card=values["model_card"],
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    for path, entry in manifest["files"].items():
        print(f"{entry['bytes']:>12,d}  {path}")
    print(f"Exported to {os.path.abspath(values['out'])}")


if __name__ == "__main__":
    _ARGS = define_flags()
    flags.mark_flags_as_required(["weights", "out"])
    app.run(lambda argv: main(argv, _ARGS))
