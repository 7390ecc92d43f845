"""Measures the training input pipeline: pairs per second, decode and augmentation included.

    python -m tools.benchmark_pipeline                      # shards from ../shared (made once)
    python -m tools.benchmark_pipeline --shards=DIR_OR_GLOB # existing face shards
    python -m tools.benchmark_pipeline --synthetic          # random shards, no ../shared needed

Without --shards, face shards are made once into --work_dir from --images (an ImageFolder;
by default the first --max_identities identities of ../shared/data/celeba_subset, with YuNet
alignment and the shared teacher) and reused by later runs. Prints the machine, the versions and
the load average next to the numbers: the machine is shared, and a busy CPU slows everything.
"""
import os
import platform
import sys
import time
import types

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xcos_tf import cli  # noqa: E402

cli.quiet_startup(__name__)  # before TensorFlow is imported

from absl import flags  # noqa: E402

from tools import machine  # noqa: E402
from xcos_tf import paths  # noqa: E402


def define_flags():
    """The command-line flags, defined only when this file runs as the program."""
    return types.SimpleNamespace(
        shards=flags.DEFINE_string("shards", None, "Existing face shards (folder or glob)."),
        synthetic=flags.DEFINE_bool("synthetic", False, "Benchmark on random synthetic shards."),
        images=flags.DEFINE_string("images", paths.shared_path("data", "celeba_subset", "images"),
                                   "ImageFolder to make shards from."),
        max_identities=flags.DEFINE_integer("max_identities", 100, "Identities of --images to use."),
        work_dir=flags.DEFINE_string("work_dir", "/tmp/xcos_tf_benchmark_shards", "Where made shards are kept."),
        batch_size=flags.DEFINE_integer("batch_size", 64, "Pairs per batch."),
        warmup_batches=flags.DEFINE_integer("warmup_batches", 20, "Batches before timing (fills shuffle buffers)."),
        batches=flags.DEFINE_integer("batches", 100, "Timed batches."),
        shuffle_buffer=flags.DEFINE_integer("shuffle_buffer", 10_000, "Records per shuffle buffer."),
    )


def _make_real_shards(out_dir, args):
    from xcos_tf.data import prepare, shard_writer

    identities = set(sorted(os.listdir(args.images.value))[:args.max_identities.value])
    items = [item for item in shard_writer.list_image_folder(args.images.value) if item[1] in identities]
    settings = prepare.Settings(detector=paths.DEFAULT_DETECTOR, teacher={"path": paths.DEFAULT_TEACHER})
    manifest = shard_writer.make_face_shards(items, args.images.value, out_dir, settings, shard_mb=10.0)
    return manifest


def _measure(dataset, warmup, batches):
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return time.perf_counter() - start


def main(argv, args):
    del argv
    import cv2
    import numpy as np
    import tensorflow as tf

    from xcos_tf.data import pipeline, records

    if args.synthetic.value:
        source = os.path.join(args.work_dir.value, "synthetic")
        records.write_synthetic_shards(source, num_shards=4, records_per_shard=500, num_classes=200, seed=0)
        description = "synthetic: 2000 random faces, 200 classes"
    elif args.shards.value:
        source, description = args.shards.value, f"shards {args.shards.value}"
    else:
        source = os.path.join(args.work_dir.value, f"celeba_{args.max_identities.value}")
        manifest = _make_real_shards(source, args)
        description = (f"{manifest['num_records']} aligned faces of {manifest['num_classes']} identities "
                       f"from {args.images.value}, {len(manifest['shards'])} shard(s), JPEG, teacher embeddings")
    scan = pipeline.scan_shards(source)

    print(f"machine: {machine.describe()}, load average {os.getloadavg()[0]:.1f} (1 min)")
    print(f"versions: python {platform.python_version()}, tensorflow {tf.__version__}, numpy {np.__version__}, "
          f"opencv {cv2.__version__}")
    print(f"data: {description}; {sum(scan.counts)} records")
    print(f"batch {args.batch_size.value} pairs, {args.warmup_batches.value} warm-up + {args.batches.value} "
          "timed batches")
    for name, kwargs in (
        ("augment, non-deterministic (training default)", {}),
        ("augment, deterministic", {"deterministic": True}),
        ("no augment", {"augment": False}),
    ):
        dataset = pipeline.pair_dataset(source, args.batch_size.value, seed=0,
                                        shuffle_buffer=args.shuffle_buffer.value, **kwargs)
        seconds = _measure(dataset, args.warmup_batches.value, args.batches.value)
        pairs_per_second = args.batches.value * args.batch_size.value / seconds
        print(f"  {name:48s} {pairs_per_second:8.0f} pairs/s  ({2 * pairs_per_second:.0f} images/s)")
    print("compare with the training step's rate: python tools/benchmark_training.py")


if __name__ == "__main__":
    _ARGS = define_flags()
    cli.run(lambda argv: main(argv, _ARGS))