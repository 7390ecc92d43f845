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

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xcos_tf import cli  # noqa: E402

cli.quiet_startup(__name__)  # before TensorFlow is imported

from absl import flags  # noqa: E402

from xcos_tf import teacher as teacher_lib  # noqa: E402
from xcos_tf.data import align, prepare  # noqa: E402

_SHARED_IMAGES = os.path.join(os.path.dirname(align.DEFAULT_DETECTOR), os.pardir, "data", "celeba_subset", "images")

_SHARDS = flags.DEFINE_string("shards", None, "Existing face shards (folder or glob).")
_SYNTHETIC = flags.DEFINE_bool("synthetic", False, "Benchmark on random synthetic shards.")
_IMAGES = flags.DEFINE_string("images", os.path.normpath(_SHARED_IMAGES), "ImageFolder to make shards from.")
_MAX_IDENTITIES = flags.DEFINE_integer("max_identities", 100, "Identities of --images to use.")
_WORK_DIR = flags.DEFINE_string("work_dir", "/tmp/xcos_tf_benchmark_shards", "Where made shards are kept.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Pairs per batch.")
_WARMUP = flags.DEFINE_integer("warmup_batches", 20, "Batches before timing (fills shuffle buffers).")
_BATCHES = flags.DEFINE_integer("batches", 100, "Timed batches.")
_SHUFFLE_BUFFER = flags.DEFINE_integer("shuffle_buffer", 10_000, "Records per shuffle buffer.")


def _make_real_shards(out_dir):
    from xcos_tf.data import shard_writer

    identities = set(sorted(os.listdir(_IMAGES.value))[:_MAX_IDENTITIES.value])
    items = [item for item in shard_writer.list_image_folder(_IMAGES.value) if item[1] in identities]
    settings = prepare.Settings(detector=align.DEFAULT_DETECTOR, teacher={"path": teacher_lib.DEFAULT_TEACHER})
    manifest = shard_writer.make_face_shards(items, _IMAGES.value, out_dir, settings, shard_mb=10.0)
    return manifest


def _measure(dataset, warmup, batches):
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return time.perf_counter() - start


def main(argv):
    del argv
    import cv2
    import numpy as np
    import tensorflow as tf

    from xcos_tf.data import pipeline, records

    if _SYNTHETIC.value:
        source = os.path.join(_WORK_DIR.value, "synthetic")
        records.write_synthetic_shards(source, num_shards=4, records_per_shard=500, num_classes=200, seed=0)
        description = "synthetic: 2000 random faces, 200 classes"
    elif _SHARDS.value:
        source, description = _SHARDS.value, f"shards {_SHARDS.value}"
    else:
        source = os.path.join(_WORK_DIR.value, f"celeba_{_MAX_IDENTITIES.value}")
        manifest = _make_real_shards(source)
        description = (f"{manifest['num_records']} aligned faces of {manifest['num_classes']} identities "
                       f"from {_IMAGES.value}, {len(manifest['shards'])} shard(s), JPEG, teacher embeddings")
    scan = pipeline.scan_shards(source)

    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} (1 min)")
    print(f"versions: python {platform.python_version()}, tensorflow {tf.__version__}, numpy {np.__version__}, "
          f"opencv {cv2.__version__}")
    print(f"data: {description}; {sum(scan.counts)} records")
    print(f"batch {_BATCH_SIZE.value} pairs, {_WARMUP.value} warm-up + {_BATCHES.value} timed batches")
    for name, kwargs in (
        ("augment, non-deterministic (training default)", {}),
        ("augment, deterministic", {"deterministic": True}),
        ("no augment", {"augment": False}),
    ):
        dataset = pipeline.pair_dataset(source, _BATCH_SIZE.value, seed=0, shuffle_buffer=_SHUFFLE_BUFFER.value, **kwargs)
        seconds = _measure(dataset, _WARMUP.value, _BATCHES.value)
        pairs_per_second = _BATCHES.value * _BATCH_SIZE.value / seconds
        print(f"  {name:48s} {pairs_per_second:8.0f} pairs/s  ({2 * pairs_per_second:.0f} images/s)")
    print("compare with the training step's rate: python tools/benchmark_training.py")


if __name__ == "__main__":
    cli.run(main)