r"""Training speed on this machine: images per second of xcos_tf.train's own train step.

Cases: MobileFaceNet and IR-SE-50 at 112x112 under `default` (one device) and `mirrored`
(2 logical CPU devices on a CPU-only machine), and MobileFaceNet with teacher_cos computed
in the graph by a frozen teacher versus read from the batch (precomputed in the shards).
The in-graph teacher is the shared teacher's convolutional body imported from ONNX
(`xcos_tf.backbones.from_onnx`, up to its 7x7x512 map; its last GDConv and linear layer,
a tiny share of the compute, are left out) and teacher_cos is the cosine of those maps.

Besides wall-clock images/s, each case reports images per CPU-second (the process's CPU time,
all threads): on a shared machine the wall-clock rate swings with the load, the CPU cost much less.
Each case runs in its own process (logical devices must be set before TensorFlow starts),
on the synthetic source (no input cost): warm-up steps, then timed steps until both
`--min_steps` and `--seconds` are reached.

    python tools/benchmark_training.py            # all cases, a table at the end
    python tools/benchmark_training.py --seconds=60 --cases=mobilefacenet/default
"""
import json
import os
import platform
import subprocess
import sys
import time

from absl import app, flags

TEACHER_ONNX = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models", "teacher_mobilefacenet.onnx")
# name -> (backbone, strategy, pairs per step (global), in-graph teacher)
CASES = {
    "mobilefacenet/default": ("mobilefacenet", "default", 16, False),
    "mobilefacenet/mirrored": ("mobilefacenet", "mirrored", 16, False),
    "ir_se50/default": ("ir_se50", "default", 8, False),
    "ir_se50/mirrored": ("ir_se50", "mirrored", 8, False),
    "mobilefacenet/default+teacher": ("mobilefacenet", "default", 16, True),
}

_CASES = flags.DEFINE_list("cases", list(CASES), f"Cases to run, of: {', '.join(CASES)}.")
_MIN_STEPS = flags.DEFINE_integer("min_steps", 3, "Timed steps per case, at least.", lower_bound=1)
_SECONDS = flags.DEFINE_float("seconds", 30.0, "Timed seconds per case, at least.", lower_bound=0.0)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first (tracing, allocation).", lower_bound=1)
_TEACHER = flags.DEFINE_string("teacher_onnx", TEACHER_ONNX, "ONNX teacher imported for the in-graph teacher case.")
_RUN_CASE = flags.DEFINE_string("run_case", "", "Internal: run one case in this process and print JSON.")


def run_case(name, min_steps, min_seconds, warmup, teacher_onnx):
    """Times one case in this process; returns a dict of its results."""
    from xcos_tf import backbones
    from xcos_tf.training import config as train_config, factory, inputs, loop

    backbone, strategy_name, pairs, with_teacher = CASES[name]
    if strategy_name == "mirrored":
        factory.configure_cpu_devices(2)
    strategy = factory.make_strategy(strategy_name)
    config = train_config.TrainConfig(
        model_dir="unused", data="synthetic", num_classes=1000, backbone=backbone,
        batch_size=pairs // strategy.num_replicas_in_sync,
    )
    with strategy.scope():
        trainer = factory.build_model(config, strategy.num_replicas_in_sync)
        teacher = backbones.from_onnx(teacher_onnx) if with_teacher else None
    if teacher is not None:
        teacher.trainable = False
    dataset = strategy.distribute_datasets_from_function(inputs.train_dataset_fn(config, pairs, epoch=0, skip_steps=0))
    iterator = iter(dataset)
    train_step = loop.make_train_step(strategy, trainer, teacher)
    for _ in range(warmup):
        float(train_step(iterator)["loss"])
    start, cpu_start, steps = time.perf_counter(), time.process_time(), 0
    while steps < min_steps or time.perf_counter() - start < min_seconds:
        loss = float(train_step(iterator)["loss"])
        steps += 1
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "case": name, "replicas": strategy.num_replicas_in_sync, "pairs_per_step": pairs, "steps": steps,
        "seconds": seconds, "cpu_seconds": cpu_seconds, "images_per_second": 2 * pairs * steps / seconds,
        "images_per_cpu_second": 2 * pairs * steps / cpu_seconds, "last_loss": loss,
    }


def main(argv):
    del argv
    if _RUN_CASE.value:
        print("RESULT " + json.dumps(run_case(_RUN_CASE.value, _MIN_STEPS.value, _SECONDS.value, _WARMUP.value, _TEACHER.value)))
        return
    unknown = set(_CASES.value) - set(CASES)
    if unknown:
        raise app.UsageError(f"--cases: unknown {sorted(unknown)}; valid: {', '.join(CASES)}")
    import tensorflow as tf

    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print(f"python {platform.python_version()}, tensorflow {tf.__version__}")
    results = []
    for name in _CASES.value:
        command = [sys.executable, os.path.abspath(__file__), f"--run_case={name}", f"--min_steps={_MIN_STEPS.value}", f"--seconds={_SECONDS.value}",
                   f"--warmup={_WARMUP.value}", f"--teacher_onnx={_TEACHER.value}"]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONPATH=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        output = subprocess.run(command, env=env, capture_output=True, text=True)
        line = next((l for l in output.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{output.stderr[-2000:]}")
            continue
        result = json.loads(line[len("RESULT "):])
        results.append(result)
        print(f"{name}: {result['images_per_second']:.1f} images/s, {result['images_per_cpu_second']:.2f} images "
              f"per CPU-second ({result['replicas']} replica(s), {result['pairs_per_step']} pairs/step, "
              f"{result['steps']} steps in {result['seconds']:.1f} s using {result['cpu_seconds']:.1f} CPU-s)")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print("\n| case | replicas | pairs/step | training images/s (wall) | images per CPU-second |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['replicas']} | {r['pairs_per_step']} | {r['images_per_second']:.1f} | "
              f"{r['images_per_cpu_second']:.2f} |")
    by_name = {r["case"]: r for r in results}
    if "mobilefacenet/default" in by_name and "mobilefacenet/default+teacher" in by_name:
        # Per CPU-second: the wall-clock rate swings with whatever else runs on the machine.
        precomputed = by_name["mobilefacenet/default"]["images_per_cpu_second"]
        in_graph = by_name["mobilefacenet/default+teacher"]["images_per_cpu_second"]
        print(f"\nPer CPU-second, precomputed teacher embeddings train {precomputed / in_graph:.2f}x as fast as "
              f"the in-graph teacher ({precomputed:.2f} vs {in_graph:.2f} images; the teacher costs "
              f"{100 * (1 - in_graph / precomputed):.0f} % of the throughput).")


if __name__ == "__main__":
    app.run(main)
