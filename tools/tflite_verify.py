"""Verify two photos with an xCos TFLite model, as an app on a device would.

    python tools/tflite_verify.py PHOTO_A PHOTO_B --model exported/default/xcos_int8.tflite \
        [--detector ../shared/models/yunet.onnx] [--threshold T] [--json]

Detects the largest face in each photo with YuNet, aligns it to the 112x112 template
(aligned 112x112 crops are taken as they are), runs the model's `verify` signature through
ai-edge-litert and prints the score, the decision and the 7x7 cos and attention maps. Only
ai-edge-litert, numpy and OpenCV are used: no TensorFlow, as on a phone. The threshold comes
from --threshold, else from the manifest.json beside the model (none: no decision).
Exit code 2 for a bad photo or model, with a message that names it.
"""
import argparse
import json
import os
import pathlib
import sys

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere, like an app

from xcos_tf import paths, runtime  # noqa: E402
from xcos_tf.data import align  # noqa: E402

EXIT_BAD_INPUT = 2


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photo_a", help="First photo (any size; or an aligned 112x112 crop).")
    parser.add_argument("photo_b", help="Second photo.")
    parser.add_argument("--model", required=True, help="An xCos .tflite file (xcos_tf.export).")
    parser.add_argument("--detector", default=paths.DEFAULT_DETECTOR, help="YuNet ONNX face detector.")
    parser.add_argument("--threshold", type=float, default=None, help="Decision threshold on the score.")
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")
    return parser.parse_args(argv)


def manifest_threshold(model_path):
    """The threshold recorded in the manifest.json beside the model (checked: a string or NaN
    is a ManifestError), or None."""
    model_dir = os.path.dirname(os.path.abspath(model_path))
    if not os.path.isfile(os.path.join(model_dir, runtime.MANIFEST_FILE)):
        return None
    return runtime.read_manifest(model_dir).get("threshold")


def verify_photos(photo_a, photo_b, model, aligner):
    """Aligns both photos and verifies them: a JSON-ready dict."""
    faces = {}
    for key, path in (("a", photo_a), ("b", photo_b)):
        try:
            faces[key] = aligner.align(align.read_image(path))
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


def main(argv=None):
    args = parse_args(argv)
    try:
        model = runtime.TFLiteRuntime(args.model)
        model.threshold = args.threshold if args.threshold is not None else manifest_threshold(args.model)
        aligner = align.FaceAligner(args.detector, choose="largest")
        result = verify_photos(args.photo_a, args.photo_b, model, aligner)
    except (ValueError, FileNotFoundError) as error:  # ImageError and FaceError are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps(result))
        return 0
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
