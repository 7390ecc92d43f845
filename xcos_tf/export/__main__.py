"""`python -m xcos_tf.export --weights RUN_DIR_OR_KERAS --out DIR [--formats ...]`: see `xcos_tf.export`."""
import logging as python_logging
import os

from xcos_tf import cli

cli.quiet_startup(__name__)  # before TensorFlow is imported

import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402

from xcos_tf.data import align  # noqa: E402
from xcos_tf.export.deployment import CALIBRATION_SIZE, export_model, load_faces, resolve_verifier, run_teacher  # noqa: E402
from xcos_tf.runtime import FORMATS  # noqa: E402


def define_flags():
    """The CLI's flags, defined only when run as a program."""
    return {
        "weights": flags.DEFINE_string("weights", None, "A trainer saved as `.keras`, or a training run folder (--model_dir)."),
        "out": flags.DEFINE_string("out", None, "The deployment folder to write (replaced once the new one is complete)."),
        "formats": flags.DEFINE_list("formats", list(FORMATS), f"Formats to write, from: {', '.join(FORMATS)}."),
        "name": flags.DEFINE_string("name", "xcos", "Model name: file names and the TF Serving model name."),
        "calibration_dir": flags.DEFINE_string(
            "calibration_dir", None, "Folder of aligned faces of the model's input size for int8 calibration (and the sample request)."
        ),
        "calibration_size": flags.DEFINE_integer("calibration_size", CALIBRATION_SIZE, "How many calibration faces to use."),
        "sample_faces": flags.DEFINE_list("sample_faces", [], "Two aligned face images for tf_serving_request.json."),
        "threshold": flags.DEFINE_float("threshold", None, "Decision threshold on the score, recorded in the manifest."),
        "far": flags.DEFINE_float("far", None, "False-accept rate at which --threshold was chosen."),
        "model_card": flags.DEFINE_string("model_card", None, "A MODEL_CARD.md to copy into the folder."),
        "max_megapixels": cli.define_max_megapixels(),
        "teacher_onnx": flags.DEFINE_string(
            "teacher_onnx", None,
            "The original teacher ONNX model: adds the `decompose` signature (its cosine split per cell) to the "
            "SavedModel and ONNX files. Default: the run's --init_backbone=onnx:PATH, if any; 'none' for no decompose.",
        ),
    }


def main(argv, args):
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    values = {key: holder.value for key, holder in args.items()}
    max_pixels = cli.max_pixels(values["max_megapixels"])
    # TensorFlow's own INFO lines (signature renames, saver timings) drown the export's progress.
    logging.get_absl_handler().addFilter(
        lambda record: record.levelno > python_logging.INFO or os.path.dirname(record.pathname) == os.path.dirname(os.path.abspath(__file__))
    )
    try:
        verifier = resolve_verifier(values["weights"])
        teacher_onnx, teacher_feature_map = run_teacher(values["weights"])
        if values["teacher_onnx"] is not None:
            teacher_onnx = None if values["teacher_onnx"].lower() == "none" else values["teacher_onnx"]
        if teacher_onnx:
            logging.info("decompose: the teacher %s", teacher_onnx)
        image_size = int(verifier.embed.input["image"].shape[1])  # the faces' size is the model's
        calibration = None
        if values["calibration_dir"]:
            calibration = load_faces(values["calibration_dir"], values["calibration_size"], image_size, max_pixels)
        sample = None
        if values["sample_faces"]:
            if len(values["sample_faces"]) != 2:
                raise ValueError(f"--sample_faces takes two images. Received: {values['sample_faces']}")
            sample = np.stack([align.read_image(path, max_pixels) for path in values["sample_faces"]])
        manifest = export_model(
            verifier,
            values["out"],
            formats=values["formats"],
            name=values["name"],
            threshold=values["threshold"],
            far=values["far"],
            calibration_images=calibration,
            sample_faces=sample,
            model_card=values["model_card"],
            teacher_onnx=teacher_onnx,
            teacher_feature_map=teacher_feature_map,
        )
    except (ValueError, OSError) as error:  # OSError: e.g. --out under a file (one line, not a traceback)
        raise cli.UserError(str(error)) from None
    for path, entry in manifest["files"].items():
        print(f"{entry['bytes']:>12,d}  {path}")
    print(f"Exported to {os.path.abspath(values['out'])}")


if __name__ == "__main__":
    _ARGS = define_flags()
    flags.mark_flags_as_required(["weights", "out"])
    cli.run(lambda argv: main(argv, _ARGS))
