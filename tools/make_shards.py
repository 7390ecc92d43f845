r"""Raw photos or evaluation pairs -> aligned 112x112 faces -> TFRecord shards + manifest.json.

Training faces, from an ImageFolder tree (`ROOT/IDENTITY/photo.jpg`) or a list file of
`relative/path label` lines (`-1` = no identity):

    python -m tools.make_shards --input=../shared/data/celeba_subset/images --out_dir=shards/celeba
    python -m tools.make_shards --input=train_list.txt --root=../shared/data --out_dir=shards/train
    python -m tools.make_shards --input=../shared/data/utkface_6k/images --unlabelled \
        --detect_padding=24 --out_dir=shards/utk

(UTKFace's 112x112 crops are not aligned to the template, and their faces fill the image:
--detect_padding gives YuNet the black margin it needs; 5,997 of its 6,000 faces align.)

Evaluation pairs (pair shards for `pipeline.eval_pair_dataset` and the evaluation tool):

    python -m tools.make_shards --pairs=../shared/data/lfw/pairs.txt \
        --input=../shared/data/lfw/images --out_dir=shards/lfw_pairs
    python -m tools.make_shards --bin=agedb_30.bin --out_dir=shards/agedb_30

Quick trials: `--max_images=N` (face shards) or `--max_pairs=N` (pair shards) take at most N,
evenly spread over the sorted image list or the pairs file (every fold, both kinds of pair).

The work is done by `xcos_tf.data.shard_writer`: see there for the manifest, determinism and
resuming an interrupted run (re-run the same command).
"""
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xcos_tf import cli  # noqa: E402

cli.quiet_startup(__name__)  # before TensorFlow is imported

from absl import app, flags, logging  # noqa: E402

from xcos_tf import teacher as teacher_lib  # noqa: E402
from xcos_tf.data import align, pairs as pairs_lib, prepare  # noqa: E402

# No module-level import of shard_writer (it imports TensorFlow): worker processes are spawned
# and re-import this script, and must stay light.

# === Command line ===

_INPUT = flags.DEFINE_string("input", None, "ImageFolder root (ROOT/IDENTITY/photo.jpg), a list file of "
                             "'relative/path label' lines, or with --pairs the LFW image folder.")
_ROOT = flags.DEFINE_string("root", None, "Folder the list file's paths are relative to (default: its folder).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output folder for the shards and manifest.json.")
_PAIRS = flags.DEFINE_string("pairs", None, "LFW pairs file (pairs.txt): write evaluation pair shards.")
_BIN = flags.DEFINE_string("bin", None, "insightface .bin file: write evaluation pair shards.")
_UNLABELLED = flags.DEFINE_bool("unlabelled", False, "All images have no identity (label -1), e.g. UTKFace.")
_EXCLUDE_PAIRS_PEOPLE = flags.DEFINE_string(
    "exclude_pairs_people", None, "An LFW pairs file: leave out every identity it names (honest LFW numbers).")
_DETECTOR = flags.DEFINE_string("detector", align.DEFAULT_DETECTOR,
                                "YuNet face detector ONNX file, or 'none' with --assume_aligned.")
_CHOOSE = flags.DEFINE_enum("choose", "central", list(align.CHOICES), "Which face when there are several.")
_MIN_FACE_SIZE = flags.DEFINE_integer("min_face_size", 20, "Smaller faces (pixels) are rejected as too small.")
_SCORE_THRESHOLD = flags.DEFINE_float("score_threshold", 0.6, "Face detector confidence threshold.")
_ASSUME_ALIGNED = flags.DEFINE_bool(
    "assume_aligned", False, "Take every image as an aligned crop: no detection, resized to 112x112 if needed. "
    "(Without it, only exactly 112x112 images skip detection.)")
_DETECT_PADDING = flags.DEFINE_integer(
    "detect_padding", 0, "Pixels of black border added around each image before face detection (then "
    "112x112 images are detected too), for crops where the face fills the image, e.g. UTKFace: YuNet "
    "needs a margin around a face to place its landmarks. Landmarks stay in the original image's pixels.",
    lower_bound=0)
_TEACHER = flags.DEFINE_string("teacher", teacher_lib.DEFAULT_TEACHER,
                               "Teacher model (.onnx, .tflite or SavedModel folder), or 'none'.")
_TEACHER_COLOR = flags.DEFINE_enum("teacher_color", "rgb", ["rgb", "bgr"], "Teacher input channel order.")
_TEACHER_MEAN = flags.DEFINE_float("teacher_mean", 127.5, "Teacher input: (pixel - mean) * scale.")
_TEACHER_SCALE = flags.DEFINE_float("teacher_scale", 1.0 / 128.0, "Teacher input: (pixel - mean) * scale.")
_TEACHER_LAYOUT = flags.DEFINE_enum("teacher_layout", "nchw", ["nchw", "nhwc"], "Teacher input layout.")
_IMAGE_FORMAT = flags.DEFINE_enum("image_format", "jpeg", ["jpeg", "png"], "Encoding of the aligned faces.")
_JPEG_QUALITY = flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality of the aligned faces.")
_SHARD_MB = flags.DEFINE_float("shard_mb", 100.0, "Target shard size in MB.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", None, "Worker processes (default: one per CPU core).")
_PREFIX = flags.DEFINE_string("prefix", None, "Shard file prefix (default: train, or pairs).")
_SHUFFLE_SEED = flags.DEFINE_integer("shuffle_seed", 0, "Seed of the record order; -1 keeps the sorted order.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace shards in --out_dir made with other settings.")
_MAX_IMAGES = flags.DEFINE_integer(
    "max_images", None, "Face shards: take at most this many images, evenly spread over the sorted list "
    "(most identities keep some), for quick trials.", lower_bound=1)
_MAX_PAIRS = flags.DEFINE_integer(
    "max_pairs", None, "Pair shards: take at most this many pairs, evenly spread (every fold, same and "
    "different), for quick trials.", lower_bound=1)


def _settings_from_flags():
    teacher = None
    if _TEACHER.value.lower() != "none":
        teacher = {"path": _TEACHER.value, "color": _TEACHER_COLOR.value, "mean": _TEACHER_MEAN.value,
                   "scale": _TEACHER_SCALE.value, "layout": _TEACHER_LAYOUT.value}
    return prepare.Settings(
        detector=None if _DETECTOR.value.lower() == "none" else _DETECTOR.value, choose=_CHOOSE.value,
        min_face_size=_MIN_FACE_SIZE.value, score_threshold=_SCORE_THRESHOLD.value,
        assume_aligned=_ASSUME_ALIGNED.value, detect_padding=_DETECT_PADDING.value,
        image_format=_IMAGE_FORMAT.value, jpeg_quality=_JPEG_QUALITY.value, teacher=teacher,
    )


def main(argv):
    try:
        _make_shards(argv)
    except (ValueError, OSError) as e:
        # Bad input (missing file, unreadable list, changed settings): the message, no traceback.
        cli.fail(f"make_shards: {e}")


def _make_shards(argv):
    from xcos_tf.data import shard_writer  # see the note at the imports

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _PAIRS.value and _BIN.value:
        raise app.UsageError("Give --pairs (with --input) or --bin, not both")
    settings = _settings_from_flags()
    common = dict(shard_mb=_SHARD_MB.value, num_workers=_NUM_WORKERS.value, overwrite=_OVERWRITE.value)
    pairs_only = dict(max_pairs=_MAX_PAIRS.value)
    if (_BIN.value or _PAIRS.value) and _MAX_IMAGES.value:
        raise app.UsageError("--max_images is for face shards; with --pairs or --bin give --max_pairs")
    if not (_BIN.value or _PAIRS.value) and _MAX_PAIRS.value:
        raise app.UsageError("--max_pairs is for pair shards (--pairs or --bin); for face shards give --max_images")
    if _BIN.value:
        manifest = shard_writer.make_bin_pair_shards(_BIN.value, _OUT_DIR.value, settings, prefix=_PREFIX.value or "pairs",
                                                     **common, **pairs_only)
    elif _PAIRS.value:
        if not _INPUT.value:
            raise app.UsageError("--pairs needs --input=IMAGE_FOLDER")
        manifest = shard_writer.make_lfw_pair_shards(_PAIRS.value, _INPUT.value, _OUT_DIR.value, settings,
                                        prefix=_PREFIX.value or "pairs", **common, **pairs_only)
    else:
        if not _INPUT.value:
            raise app.UsageError("--input is required (an ImageFolder root or a list file)")
        if os.path.isfile(_INPUT.value):
            root = _ROOT.value or os.path.dirname(os.path.abspath(_INPUT.value))
            items = shard_writer.read_list_file(_INPUT.value)
            if _UNLABELLED.value:
                items = [(path, None) for path, _ in items]
        else:
            root = _INPUT.value
            items = shard_writer.list_image_folder(root, _UNLABELLED.value)
        if _EXCLUDE_PAIRS_PEOPLE.value:
            excluded = set(pairs_lib.people_in_pairs(pairs_lib.read_lfw_pairs(_EXCLUDE_PAIRS_PEOPLE.value)))
            kept = [item for item in items if item[1] not in excluded]
            logging.info("Left out %d images of people named in %s", len(items) - len(kept), _EXCLUDE_PAIRS_PEOPLE.value)
            items = kept
        if _MAX_IMAGES.value:
            items = sorted(items, key=lambda item: (item[0], item[1] or ""))
            items = [items[i] for i in pairs_lib.spread_subset(len(items), _MAX_IMAGES.value)]
        manifest = shard_writer.make_face_shards(
            items, root, _OUT_DIR.value, settings, prefix=_PREFIX.value or "train",
            shuffle_seed=None if _SHUFFLE_SEED.value < 0 else _SHUFFLE_SEED.value,
            source=_INPUT.value, **common)
    print(f"{manifest['num_records']} records in {len(manifest['shards'])} shard(s) in {_OUT_DIR.value}; "
          f"rejects: {manifest['reject_counts'] or 'none'}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["out_dir"])
    cli.run(main)
