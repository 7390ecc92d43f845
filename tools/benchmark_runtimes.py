"""Pairs per second of every xCos runtime on this CPU, and the size of each exported file.

    python tools/benchmark_runtimes.py [--backbone mobilefacenet] [--batch_sizes 1,16] [--threads 1]

Builds a verifier on the chosen backbone with RANDOM weights (speed does not depend on the
weights; --weights times a trained model instead), exports it with `xcos_tf.export` (int8 calibrated on real aligned faces from
--calibration_dir), then times `verify` on real face pairs in Keras (`predict_on_batch`),
the SavedModel, TFLite float32 / float16 / int8 (ai-edge-litert) and onnxruntime. Also
prints each runtime's largest score difference to Keras on those pairs. Prints the machine,
its load and the versions with the table: figures from a busy machine are lower.
"""
import os
import pathlib
import sys
import tempfile
import time
import types

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from xcos_tf import cli  # noqa: E402

cli.quiet_startup(__name__)  # before TensorFlow is imported

from absl import flags  # noqa: E402

from tools import machine  # noqa: E402
from xcos_tf import paths  # noqa: E402


def define_flags():
    """The command-line flags, defined only when this file runs as the program."""
    return types.SimpleNamespace(
        backbone=flags.DEFINE_string("backbone", "mobilefacenet",
                                     "Backbone of the random-weight model (xcos_tf.backbones.get)."),
        weights=flags.DEFINE_string("weights", None,
                                    "Time this trained model (.keras or run folder) instead of a random one."),
        batch_sizes=flags.DEFINE_list("batch_sizes", ["1", "16"], "Pairs per call to time."),
        seconds=flags.DEFINE_float("seconds", 3.0,
                                   "Timed seconds per runtime, batch size and repeat (after warm-up)."),
        repeats=flags.DEFINE_integer("repeats", 3, "Round-robin repeats; the best pairs/s of each cell is reported."),
        threads=flags.DEFINE_integer("threads", os.cpu_count(), "CPU threads for TFLite and onnxruntime."),
        calibration_dir=flags.DEFINE_string(
            "calibration_dir", paths.shared_path("data", "glint_sample", "images"),
            "Aligned 112x112 faces: int8 calibration and the timed pairs.",
        ),
        calibration_size=flags.DEFINE_integer("calibration_size", 200, "Faces for int8 calibration."),
        out=flags.DEFINE_string("out", None, "Keep the export here (default: a temporary folder)."),
        reuse=flags.DEFINE_bool("reuse", False,
                                "Time the export already in --out (same backbone and seed) instead of exporting."),
    )


def folder_bytes(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def pairs_per_second(verify, faces_a, faces_b, batch_size, seconds):
    """Calls `verify` on batches of `batch_size` pairs for about `seconds`; pairs per second."""
    a, b = faces_a[:batch_size], faces_b[:batch_size]
    for _ in range(3):  # warm-up: tracing, allocation, XNNPACK packing
        verify(a, b)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 3:
        verify(a, b)
        calls += 1
    return calls * batch_size / (time.perf_counter() - start)


def main(argv, args):
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    import keras
    import numpy as np

    from xcos_tf import backbones, export, runtime
    from xcos_tf import model as xcos_model

    batch_sizes = [int(size) for size in args.batch_sizes.value]
    if args.weights.value:
        verifier, model_label = export.resolve_verifier(args.weights.value), f"{args.weights.value} (given weights)"
    else:
        keras.utils.set_random_seed(0)
        trainer = xcos_model.build_trainer(backbones.get(args.backbone.value), num_classes=1000)
        verifier = xcos_model.build_verifier(trainer)
        model_label = f"{args.backbone.value} + 7x7x32 grid + xCos head, random weights"
    faces = export.load_faces(args.calibration_dir.value, args.calibration_size.value)
    pair_count = max(batch_sizes)
    faces_a, faces_b = faces[:pair_count].astype(np.float32), faces[-pair_count:].astype(np.float32)

    with tempfile.TemporaryDirectory() as scratch:
        out_dir = args.out.value or os.path.join(scratch, "export")
        keras_path = os.path.join(scratch, "verify.keras")
        verifier.verify.save(keras_path)
        start = time.perf_counter()
        if args.reuse.value and args.out.value:
            manifest = runtime.read_manifest(out_dir)
        else:
            manifest = export.export_model(verifier, out_dir, calibration_images=faces)
        export_seconds = time.perf_counter() - start

        def keras_verify(a, b):
            return {k: np.asarray(v) for k, v in verifier.verify.predict_on_batch({"image_a": a, "image_b": b}).items()}

        formats = manifest["formats"]
        rows = [("Keras (predict_on_batch)", keras_verify, keras_path, "verify model as .keras")]
        for model_format in runtime.FORMATS:
            model = runtime.load(out_dir, format=model_format, num_threads=args.threads.value)
            if model_format == "onnx":
                files = [os.path.join(out_dir, path) for path in formats["onnx"]["signatures"].values()]
                size_note = "verify graph (+ embed, compare files)"
            else:
                files = [os.path.join(out_dir, formats[model_format]["path"])]
                size_note = "folder" if model_format == "saved_model" else "one file, 3 signatures"
            rows.append((model_format, model.verify, files[0], size_note))

        reference = keras_verify(faces_a, faces_b)["score"]
        # Round-robin repeats, best kept: on a shared machine the other processes' load comes
        # and goes, and each runtime then gets its share of the quieter moments.
        best = {(label, size): 0.0 for label, *_ in rows for size in batch_sizes}
        for _ in range(args.repeats.value):
            for label, verify, *_ in rows:
                for size in batch_sizes:
                    speed = pairs_per_second(verify, faces_a, faces_b, size, args.seconds.value)
                    best[label, size] = max(best[label, size], speed)
        results = []
        for label, verify, path, size_note in rows:
            error = float(np.abs(verify(faces_a, faces_b)["score"] - reference).max())
            speeds = [best[label, size] for size in batch_sizes]
            results.append((label, speeds, folder_bytes(path) / 1e6, size_note, error))

    print(f"Machine: {machine.describe()}")
    print(f"Load average during the run (1/5/15 min): {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    versions = manifest["versions"]
    print("Versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()))
    print(
        f"Model: {model_label} ({manifest['model']['parameters']:,} parameters); "
        + ("export reused from --out; " if args.reuse.value else f"export of all formats took {export_seconds:.0f} s; ")
        + f"TFLite/onnxruntime threads: {args.threads.value}; {pair_count} real face pairs, "
        f"best of {args.repeats.value} x {args.seconds.value:g} s per cell."
    )
    print()
    header = " | ".join(f"pairs/s @ batch {size}" for size in batch_sizes)
    print(f"| runtime | {header} | size (MB) | what the size counts | max abs score diff to Keras |")
    print("|---" * (len(batch_sizes) + 4) + "|")
    for label, speeds, megabytes, size_note, error in results:
        cells = " | ".join(f"{speed:.1f}" for speed in speeds)
        print(f"| {label} | {cells} | {megabytes:.2f} | {size_note} | {error:.1e} |")


if __name__ == "__main__":
    _ARGS = define_flags()
    cli.run(lambda argv: main(argv, _ARGS))
