"""Writes the deployment folder of an xCos model (`export_model`): every format, the manifest,
staged and moved into place when complete. The formats' own code is in `saved_model`,
`tflite` and `onnx`; the manifest's in `manifest`."""
import glob
import json
import os
import re
import shutil
import tempfile

import keras
import numpy as np
from absl import logging

from xcos_tf import backbones
from xcos_tf import model as xcos_model
from xcos_tf.data import align, image_io, records
from xcos_tf.explanations import decomposition
from xcos_tf.export import manifest as manifest_module
from xcos_tf.export import onnx, saved_model, tflite
from xcos_tf.export.staging import staged_folder
from xcos_tf.runtime import FORMATS, MANIFEST_FILE
from xcos_tf.training import run_folder
from xcos_tf.training.config import TrainConfig

CALIBRATION_SIZE = 300


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


def run_teacher(weights):
    """(ONNX path, feature map) of the teacher a training run started from (--init_backbone=onnx:PATH,
    --onnx_feature_map), or (None, None) when `weights` is not such a run."""
    if not isinstance(weights, (str, os.PathLike)) or not os.path.isfile(os.path.join(weights, run_folder.PARAMS_FILE)):
        return None, None
    config = TrainConfig.from_json(os.path.join(weights, run_folder.PARAMS_FILE))
    if not config.init_backbone.startswith("onnx:"):
        return None, None
    return config.init_backbone[len("onnx:"):], config.onnx_feature_map or None


def teacher_decomposition(verifier, teacher_onnx, feature_map=None):
    """The `decompose` model of the ORIGINAL teacher (`explanations.decomposition`): its body and
    linear tail read from `teacher_onnx`, cut at the same map as the xCos body.

    When the xCos body still holds the teacher's weights (the recipe freezes it), the decompose
    model runs the xCos body itself, so the export stores those weights once; a fine-tuned body
    is not the teacher any more and the teacher's own body is used.
    """
    if not os.path.isfile(teacher_onnx):
        raise FileNotFoundError(f"Teacher ONNX model not found: {teacher_onnx!r} (--teacher_onnx)")
    image_shape = tuple(verifier.embed.input["image"].shape[1:])
    tail = backbones.read_linear_tail(teacher_onnx, feature_map=feature_map, input_shape=image_shape)
    teacher_body = backbones.from_onnx(teacher_onnx, feature_map=feature_map, input_shape=image_shape)
    xcos_body = next(layer for layer in verifier.embed.layers if isinstance(layer, keras.Model))
    body = xcos_body if same_weights(xcos_body, teacher_body) else teacher_body
    return decomposition.decomposition_model(body, tail, name="decompose"), body is xcos_body


def same_weights(model_a, model_b):
    """Whether two models hold equal weights, in the same order and shapes."""
    weights_a, weights_b = model_a.get_weights(), model_b.get_weights()
    return len(weights_a) == len(weights_b) and all(
        a.shape == b.shape and np.array_equal(a, b) for a, b in zip(weights_a, weights_b)
    )


def _checked_faces(faces, what, image_shape):
    faces = np.asarray(faces)
    if faces.dtype != np.uint8 or faces.ndim != 4 or faces.shape[1:] != tuple(image_shape):
        raise ValueError(
            f"`{what}` must be aligned faces of the model's input, uint8 [N, {', '.join(map(str, image_shape))}]. "
            f"Received: dtype={faces.dtype}, shape={faces.shape}"
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
    teacher_onnx=None,
    teacher_feature_map=None,
):
    """Exports `source` to the deployment folder `out_dir` (replaced only once complete).

    Args:
        source: an `XCosTrainer`, a `Verifier`, a `.keras` file or a training run folder.
        out_dir: str, the folder to write (see the module docstring for its layout).
        formats: iterable of `FORMATS` entries.
        name: str, the model name: file names and the TF Serving model name.
        threshold: optional float, the decision threshold on the score.
        far: optional float, the false-accept rate at which `threshold` was chosen.
        calibration_images: uint8 [N, H, W, 3] aligned faces of the model's input size; required for `tflite_int8`
            (a few hundred real faces; consecutive faces are paired for `verify`).
        sample_faces: optional uint8 [2, H, W, 3], the pair in tf_serving_request.json
            (default: the first two calibration faces, else two grey images).
        model_card: optional path of a MODEL_CARD.md to copy in.
        teacher_onnx: optional path of the original teacher ONNX model (the one the run started
            from): adds the `decompose` signature (SavedModel and ONNX), the exact per-cell split of
            the teacher's cosine (`teacher_decomposition`).
        teacher_feature_map: the teacher's node whose output is the 7x7 map (default: auto).

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
    if "tflite_int8" in formats and (calibration_images is None or len(calibration_images) < 2):
        raise ValueError("tflite_int8 needs `calibration_images`: a few hundred aligned faces (--calibration_dir).")
    if model_card is not None and not os.path.isfile(model_card):
        raise FileNotFoundError(f"Model card not found: {model_card!r}")
    # The faces' size is the model's: read it from the model, never assumed.
    verifier = resolve_verifier(source)
    image_shape = tuple(verifier.embed.input["image"].shape[1:])
    if calibration_images is not None:
        calibration_images = _checked_faces(calibration_images, "calibration_images", image_shape)
    if sample_faces is not None:
        sample_faces, sample_note = _checked_faces(sample_faces, "sample_faces", image_shape)[:2], "given"
    elif calibration_images is not None:
        sample_faces, sample_note = calibration_images[:2], "the first two calibration faces"
    else:
        sample_faces, sample_note = np.full((2, *image_shape), 128, np.uint8), "grey placeholders (no faces given)"
    decomposer, teacher = None, None
    if teacher_onnx:
        decomposer, shares_body = teacher_decomposition(verifier, teacher_onnx, teacher_feature_map)
        teacher = {"onnx": os.path.basename(teacher_onnx), "sha256": records.sha256_file(teacher_onnx),
                   "shares_xcos_body": shares_body}

    with staged_folder(out_dir) as staging, tempfile.TemporaryDirectory() as scratch:
        saved_model_dir = os.path.join(staging if "saved_model" in formats else scratch, "saved_model", name, "1")
        logging.info("Writing the SavedModel to %s", saved_model_dir)
        saved_model.write_saved_model(verifier, saved_model_dir, decomposer)
        if "saved_model" in formats:
            with open(os.path.join(staging, "models.config"), "w") as f:
                f.write(saved_model.models_config(name))
            with open(os.path.join(staging, "tf_serving_request.json"), "w") as f:
                json.dump(saved_model.tf_serving_request(*sample_faces[:2]), f, separators=(",", ":"))
        int8_summary = {}
        for tflite_format, suffix in manifest_module.TFLITE_SUFFIXES.items():
            if tflite_format not in formats:
                continue
            logging.info("Converting to %s", tflite_format)
            if tflite_format == "tflite_int8":
                model_bytes = tflite.convert_tflite(
                    saved_model_dir,
                    "int8",
                    tflite.representative_dataset(verifier, calibration_images),
                    tflite.quantisable_layer_names(verifier),
                )
                int8_summary = tflite.int8_op_summary(model_bytes)
            else:
                model_bytes = tflite.convert_tflite(saved_model_dir, "float16" if suffix else "float32")
            with open(os.path.join(staging, f"{name}{suffix}.tflite"), "wb") as f:
                f.write(model_bytes)
        if "onnx" in formats:
            onnx_files = manifest_module.onnx_files(name, decomposer is not None)
            for signature, file in onnx_files.items():
                logging.info("Converting %s to ONNX", signature)
                onnx.convert_onnx(saved_model_dir, signature, os.path.join(staging, file))
            shared, unshared = onnx.share_weights(
                [os.path.join(staging, file) for file in onnx_files.values()],
                os.path.join(staging, manifest_module.onnx_weights_file(name)),
            )
            logging.info("ONNX weights: %d bytes shared by the graphs (%d bytes as separate copies)", shared, unshared)
        if model_card:
            shutil.copyfile(model_card, os.path.join(staging, "MODEL_CARD.md"))
        calibration_count = 0 if calibration_images is None else len(calibration_images)
        manifest = manifest_module.build_manifest(
            verifier, name, formats, threshold, far, calibration_count, int8_summary, sample_note, teacher
        )
        manifest["files"] = manifest_module.file_digests(staging)
        with open(os.path.join(staging, MANIFEST_FILE), "w") as f:
            json.dump(manifest, f, indent=2)
    return manifest


def load_faces(folder, limit=CALIBRATION_SIZE, image_size=112, max_pixels=image_io.MAX_PIXELS):
    """Up to `limit` aligned `image_size` x `image_size` faces from the images under `folder`, spread evenly over
    the sorted file list (so over the people of an ImageFolder tree); a file of more than `max_pixels` pixels is
    an `ImageError` before it is decoded."""
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
        image = align.read_image(path, max_pixels)
        if image.shape[:2] != (image_size, image_size):
            raise ValueError(
                f"{path}: expected an aligned {image_size}x{image_size} face crop, got {image.shape[1]}x{image.shape[0]}"
            )
        faces.append(image)
    return np.stack(faces)
