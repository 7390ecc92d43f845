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
import types

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


def define_flags():
    """The command-line flags, defined only when this file runs as the program (the spawned
    worker processes re-import it and define nothing)."""
    return types.SimpleNamespace(
        input=flags.DEFINE_string("input", None, "ImageFolder root (ROOT/IDENTITY/photo.jpg), a list file of "
                                  "'relative/path label' lines, or with --pairs the LFW image folder."),
        root=flags.DEFINE_string("root", None, "Folder the list file's paths are relative to (default: its folder)."),
        out_dir=flags.DEFINE_string("out_dir", None, "Output folder for the shards and manifest.json."),
        pairs=flags.DEFINE_string("pairs", None, "LFW pairs file (pairs.txt): write evaluation pair shards."),
        bin=flags.DEFINE_string("bin", None, "insightface .bin file: write evaluation pair shards."),
        unlabelled=flags.DEFINE_bool("unlabelled", False, "All images have no identity (label -1), e.g. UTKFace."),
        exclude_pairs_people=flags.DEFINE_string(
            "exclude_pairs_people", None, "An LFW pairs file: leave out every identity it names (honest LFW numbers)."),
        detector=cli.define_detector("YuNet face detector ONNX file, or 'none' with --assume_aligned."),
        choose=flags.DEFINE_enum("choose", "central", list(align.CHOICES), "Which face when there are several."),
        min_face_size=flags.DEFINE_integer("min_face_size", 20, "Smaller faces (pixels) are rejected as too small."),
        score_threshold=flags.DEFINE_float("score_threshold", 0.6, "Face detector confidence threshold."),
        assume_aligned=flags.DEFINE_bool(
            "assume_aligned", False, "Take every image as an aligned crop: no detection, resized to 112x112 if "
            "needed. (Without it, only exactly 112x112 images skip detection.)"),
        detect_padding=flags.DEFINE_integer(
            "detect_padding", 0, "Pixels of black border added around each image before face detection (then "
            "112x112 images are detected too), for crops where the face fills the image, e.g. UTKFace: YuNet "
            "needs a margin around a face to place its landmarks. Landmarks stay in the original image's pixels.",
            lower_bound=0),
        max_megapixels=cli.define_max_megapixels(),
        teacher=flags.DEFINE_string("teacher", teacher_lib.DEFAULT_TEACHER,
                                    "Teacher model (.onnx, .tflite or SavedModel folder), or 'none'."),
        teacher_color=flags.DEFINE_enum("teacher_color", "rgb", ["rgb", "bgr"], "Teacher input channel order."),
        teacher_mean=flags.DEFINE_float("teacher_mean", 127.5, "Teacher input: (pixel - mean) * scale."),
        teacher_scale=flags.DEFINE_float("teacher_scale", 1.0 / 128.0, "Teacher input: (pixel - mean) * scale."),
        teacher_layout=flags.DEFINE_enum("teacher_layout", "nchw", ["nchw", "nhwc"], "Teacher input layout."),
        image_format=flags.DEFINE_enum("image_format", "jpeg", ["jpeg", "png"], "Encoding of the aligned faces."),
        jpeg_quality=flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality of the aligned faces."),
        shard_mb=flags.DEFINE_float("shard_mb", 100.0, "Target shard size in MB."),
        num_workers=flags.DEFINE_integer("num_workers", None, "Worker processes (default: one per CPU core)."),
        prefix=flags.DEFINE_string("prefix", None, "Shard file prefix (default: train, or pairs)."),
        shuffle_seed=flags.DEFINE_integer("shuffle_seed", 0, "Seed of the record order; -1 keeps the sorted order."),
        overwrite=flags.DEFINE_bool("overwrite", False, "Replace shards in --out_dir made with other settings."),
        max_images=flags.DEFINE_integer(
            "max_images", None, "Face shards: take at most this many images, evenly spread over the sorted list "
            "(most identities keep some), for quick trials.", lower_bound=1),
        max_pairs=flags.DEFINE_integer(
            "max_pairs", None, "Pair shards: take at most this many pairs, evenly spread (every fold, same and "
            "different), for quick trials.", lower_bound=1),
    )


def _settings_from_flags(args):
    teacher = None
    if args.teacher.value.lower() != "none":
        teacher = {"path": args.teacher.value, "color": args.teacher_color.value, "mean": args.teacher_mean.value,
                   "scale": args.teacher_scale.value, "layout": args.teacher_layout.value}
    return prepare.Settings(
        detector=None if args.detector.value.lower() == "none" else args.detector.value, choose=args.choose.value,
        min_face_size=args.min_face_size.value, score_threshold=args.score_threshold.value,
        assume_aligned=args.assume_aligned.value, detect_padding=args.detect_padding.value,
        image_format=args.image_format.value, jpeg_quality=args.jpeg_quality.value, teacher=teacher,
        max_pixels=cli.max_pixels(args.max_megapixels.value),
    )


def main(argv, args):
    try:
        _make_shards(argv, args)
    except (ValueError, OSError) as e:
        # Bad input (missing file, unreadable list, changed settings): the message, no traceback.
        cli.fail(f"make_shards: {e}")


def _make_shards(argv, args):
    from xcos_tf.data import shard_writer  # see the note at the imports

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if args.pairs.value and args.bin.value:
        raise app.UsageError("Give --pairs (with --input) or --bin, not both")
    settings = _settings_from_flags(args)
    common = dict(shard_mb=args.shard_mb.value, num_workers=args.num_workers.value, overwrite=args.overwrite.value)
    pairs_only = dict(max_pairs=args.max_pairs.value)
    if (args.bin.value or args.pairs.value) and args.max_images.value:
        raise app.UsageError("--max_images is for face shards; with --pairs or --bin give --max_pairs")
    if not (args.bin.value or args.pairs.value) and args.max_pairs.value:
        raise app.UsageError("--max_pairs is for pair shards (--pairs or --bin); for face shards give --max_images")
    if args.bin.value:
        manifest = shard_writer.make_bin_pair_shards(args.bin.value, args.out_dir.value, settings,
                                                     prefix=args.prefix.value or "pairs", **common, **pairs_only)
    elif args.pairs.value:
        if not args.input.value:
            raise app.UsageError("--pairs needs --input=IMAGE_FOLDER")
        manifest = shard_writer.make_lfw_pair_shards(args.pairs.value, args.input.value, args.out_dir.value,
                                                     settings, prefix=args.prefix.value or "pairs", **common,
                                                     **pairs_only)
    else:
        if not args.input.value:
            raise app.UsageError("--input is required (an ImageFolder root or a list file)")
        if os.path.isfile(args.input.value):
            root = args.root.value or os.path.dirname(os.path.abspath(args.input.value))
            items = shard_writer.read_list_file(args.input.value)
            if args.unlabelled.value:
                items = [(path, None) for path, _ in items]
        else:
            root = args.input.value
            items = shard_writer.list_image_folder(root, args.unlabelled.value)
        if args.exclude_pairs_people.value:
            excluded = set(pairs_lib.people_in_pairs(pairs_lib.read_lfw_pairs(args.exclude_pairs_people.value)))
            kept = [item for item in items if item[1] not in excluded]
            logging.info("Left out %d images of people named in %s", len(items) - len(kept),
                         args.exclude_pairs_people.value)
            items = kept
        if args.max_images.value:
            items = sorted(items, key=lambda item: (item[0], item[1] or ""))
            items = [items[i] for i in pairs_lib.spread_subset(len(items), args.max_images.value)]
        manifest = shard_writer.make_face_shards(
            items, root, args.out_dir.value, settings, prefix=args.prefix.value or "train",
            shuffle_seed=None if args.shuffle_seed.value < 0 else args.shuffle_seed.value,
            source=args.input.value, **common)
    print(f"{manifest['num_records']} records in {len(manifest['shards'])} shard(s) in {args.out_dir.value}; "
          f"rejects: {manifest['reject_counts'] or 'none'}")


if __name__ == "__main__":
    _ARGS = define_flags()
    flags.mark_flags_as_required(["out_dir"])
    cli.run(lambda argv: main(argv, _ARGS))
