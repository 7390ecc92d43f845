"""Verify two photos with an xCos TFLite model, as an app on a device would.

    python tools/tflite_verify.py PHOTO_A PHOTO_B --model exported/default/xcos_int8.tflite \
        [--detector ../shared/models/yunet.onnx] [--threshold T] [--json] [--max_megapixels 50]

Detects the largest face in each photo with YuNet, aligns it to the 112x112 template
(aligned 112x112 crops are taken as they are), runs the model's `verify` signature through
ai-edge-litert and prints the score, the decision and the 7x7 cos and attention maps. Only
ai-edge-litert, numpy, OpenCV and absl are used: no TensorFlow, as on a phone. The threshold
comes from --threshold, else from the manifest.json beside the model (none: no decision).
Exit code 2 for a bad photo or model (a photo over --max_megapixels too), with a message that
names it.
"""
import json
import os
import pathlib
import sys
import types

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere, like an app

from absl import flags  # noqa: E402

from xcos_tf import cli, runtime  # noqa: E402
from xcos_tf.data import align, image_io  # noqa: E402


def define_flags():
    """The command-line flags, defined only when this file runs as the program."""
    return types.SimpleNamespace(
        model=cli.define_model("An xCos .tflite file (`python -m xcos_tf.export`)."),
        detector=cli.define_detector(),
        threshold=flags.DEFINE_float("threshold", None, "Decision threshold on the score (default: the manifest's)."),
        json=flags.DEFINE_bool("json", False, "Print the result as JSON."),
        max_megapixels=cli.define_max_megapixels(),
    )


def manifest_threshold(model_path):
    """The threshold recorded in the manifest.json beside the model (checked: a string or NaN
    is a ManifestError), or None."""
    model_dir = os.path.dirname(os.path.abspath(model_path))
    if not os.path.isfile(os.path.join(model_dir, runtime.MANIFEST_FILE)):
        return None
    return runtime.read_manifest(model_dir).get("threshold")


def verify_photos(photo_a, photo_b, model, aligner, max_pixels=image_io.MAX_PIXELS):
    """Aligns both photos (files of at most `max_pixels` pixels) and verifies them: a JSON-ready dict."""
    faces = {}
    for key, path in (("a", photo_a), ("b", photo_b)):
        try:
            faces[key] = aligner.align(align.read_image(path, max_pixels))
        except align.FaceError as error:
            raise align.FaceError(f"{path}: {error}") from None
    outputs = model.verify(faces["a"].image, faces["b"].image)
    score = float(outputs["score"][0])
    threshold = model.threshold
    return {
        "score": score,
        "threshold": threshold,
        "decision": None if threshold is None else ("same" if score >= threshold else "different"),
        "cos_map": np.round(outputs["cos_map"][0].astype(float), 4).tolist(),
        "attention_map": np.round(outputs["attention_map"][0].astype(float), 4).tolist(),
        "faces": {
            key: {"photo": path, "faces_found": face.num_faces, "box": np.round(face.box.astype(float), 1).tolist()}
            for (key, face), path in zip(faces.items(), (photo_a, photo_b))
        },
    }


def format_map(values, fmt):
    return "\n".join("  " + " ".join(fmt.format(value) for value in row) for row in values)


def main(argv, args):
    if len(argv) != 3:
        raise cli.UserError(f"expected two photos: tools/tflite_verify.py PHOTO_A PHOTO_B --model FILE.tflite. "
                            f"Received: {argv[1:]}")
    max_pixels = cli.max_pixels(args.max_megapixels.value)
    try:
        model = runtime.TFLiteRuntime(args.model.value)
        threshold = args.threshold.value
        model.threshold = threshold if threshold is not None else manifest_threshold(args.model.value)
        aligner = align.FaceAligner(args.detector.value, choose="largest")
        result = verify_photos(argv[1], argv[2], model, aligner, max_pixels)
    except (ValueError, FileNotFoundError) as error:  # ImageError and FaceError are ValueErrors
        raise cli.UserError(str(error)) from None
    if args.json.value:
        print(json.dumps(result))
        return
    for key in ("a", "b"):
        face = result["faces"][key]
        if face["faces_found"] > 1:
            print(f"{face['photo']}: {face['faces_found']} faces found, the largest is used.")
    decision = f" -> {result['decision']} (threshold {result['threshold']:.4f})" if result["decision"] else ""
    print(f"score {result['score']:.4f}{decision}")
    print("cos_map (per-cell cosine):")
    print(format_map(result["cos_map"], "{:+.2f}"))
    print("attention_map (weight of each cell, sums to 1):")
    print(format_map(result["attention_map"], "{:.3f}"))


if __name__ == "__main__":
    _ARGS = define_flags()
    flags.mark_flag_as_required("model")
    cli.run(lambda argv: main(argv, _ARGS))
