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

`--compare` instead times variants of one training step side by side (issue 17): Keras'
BatchNormalization and PReLU (the step before issue 17), the fused BN, Keras' BN + the PReLU
with its hand-written gradient, fused BN + that PReLU (today's step), that + XLA and that + bfloat16 mixed
precision (only on a CPU with AVX512_BF16), and with `--keras_insightface_dir`
(a checkout of leondgarse/Keras_insightface; needs tf_keras) its MobileFaceNet + NormDense +
ArcFace step under Keras 2. Every variant is a worker process of its own (settings such as the
precision policy cannot leak), built and warmed up first; then the workers take turns for
`--rounds` rounds of `--round_seconds` each, so that a change in the machine's load hits
all of them alike. The step is the trainer's own (`xcos_tf.training.loop.make_train_step`).

    python tools/benchmark_training.py --compare --models=mobilefacenet --rounds=3 --round_seconds=20 \
        --keras_insightface_dir=/tmp/Keras_insightface
"""
import json
import os
import platform
import subprocess
import sys
import time
import types

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.machine import cpu_info  # noqa: E402
from xcos_tf import cli, paths  # noqa: E402

cli.quiet_startup(__name__)  # before TensorFlow is imported

from absl import flags  # noqa: E402

# name -> (backbone, strategy, pairs per step (global), in-graph teacher)
CASES = {
    "mobilefacenet/default": ("mobilefacenet", "default", 16, False),
    "mobilefacenet/mirrored": ("mobilefacenet", "mirrored", 16, False),
    "ir_se50/default": ("ir_se50", "default", 8, False),
    "ir_se50/mirrored": ("ir_se50", "mirrored", 8, False),
    "mobilefacenet/default+teacher": ("mobilefacenet", "default", 16, True),
}

# --compare: images per step = 2 x pairs. MobileFaceNet at 32 images per step is the issue's
# Keras_insightface comparison; IR-SE-50 takes seconds per step on 2 vCPUs, so a small batch.
COMPARE_PAIRS = {"mobilefacenet": 16, "ir_se50": 2}
# variant -> (fused BN, PReLU with its hand-written gradient, --jit_compile, --mixed_precision).
# keras_bn is the step before issue 17 (Keras' own BN and PReLU ops); fused_bn+prelu is today's.
VARIANTS = {
    "keras_bn": (False, False, False, "none"),
    "fused_bn": (True, False, False, "none"),
    "keras_bn+prelu": (False, True, False, "none"),
    "fused_bn+prelu": (True, True, False, "none"),
    "fused_bn+prelu+xla": (True, True, True, "none"),
    "fused_bn+prelu+bf16": (True, True, False, "mixed_bfloat16"),
}
KERAS_INSIGHTFACE = "keras_insightface"



def define_flags():
    """The flags, defined only when this file runs as the program (tests import it)."""
    return types.SimpleNamespace(
        cases=flags.DEFINE_list("cases", list(CASES), f"Cases to run, of: {', '.join(CASES)}."),
        min_steps=flags.DEFINE_integer("min_steps", 3, "Timed steps per case, at least.", lower_bound=1),
        seconds=flags.DEFINE_float("seconds", 30.0, "Timed seconds per case, at least.", lower_bound=0.0),
        warmup=flags.DEFINE_integer("warmup", 2, "Untimed steps first (tracing, allocation).", lower_bound=1),
        teacher=flags.DEFINE_string("teacher_onnx", paths.DEFAULT_TEACHER,
                                    "ONNX teacher imported for the in-graph teacher case."),
        run_case=flags.DEFINE_string("run_case", "", "Internal: run one case in this process and print JSON."),
        compare=flags.DEFINE_bool("compare", False, "Compare the step's variants side by side instead of running --cases."),
        models=flags.DEFINE_list("models", list(COMPARE_PAIRS), f"--compare: backbones, of {', '.join(COMPARE_PAIRS)}."),
        variants=flags.DEFINE_list("variants", list(VARIANTS), f"--compare: step variants, of {', '.join(VARIANTS)}."),
        rounds=flags.DEFINE_integer("rounds", 3, "--compare: rounds; each variant runs once per round.", lower_bound=1),
        round_seconds=flags.DEFINE_float("round_seconds", 20.0, "--compare: timed seconds per variant and round.",
                                         lower_bound=0.0),
        pairs=flags.DEFINE_list("pairs_per_step", [], "--compare: MODEL=PAIRS per step overriding the defaults "
                                + ", ".join(f"{m}={p}" for m, p in COMPARE_PAIRS.items()) + " (2 images per pair)."),
        keras_insightface=flags.DEFINE_string(
            "keras_insightface_dir", "",
            "--compare: a checkout of leondgarse/Keras_insightface; adds its MobileFaceNet step."),
        worker=flags.DEFINE_string("worker", "", "Internal: MODEL:VARIANT:PAIRS, a --compare worker on stdin/stdout."),
    )


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


# === --compare: variants of one step side by side ===


def skip_reason(variant, cpu_flags):
    """Why a variant is not run on this CPU, or None."""
    if VARIANTS[variant][3] == "mixed_bfloat16" and "avx512_bf16" not in cpu_flags:
        # Without AVX512_BF16 (or AMX) bfloat16 math is emulated through float32: slower, not faster.
        return "the CPU has no AVX512_BF16 flag (bfloat16 would be emulated in float32)"
    return None


def _xcos_step(model, variant, pairs):
    """The variant's `xcos_tf.training.loop.make_train_step` on the default training config's
    model and optimizers (one device), fed one synthetic batch over and over (no input cost)."""
    import keras

    from xcos_tf.layers import batch_norm, prelu
    from xcos_tf.training import config as train_config, factory, inputs, loop

    fused, custom_prelu, jit_compile, precision = VARIANTS[variant]
    # The steps before issue 17's changes, in this process only: set before the model is built.
    if not fused:
        batch_norm.BatchNormalization.call = keras.layers.BatchNormalization.call
    if not custom_prelu:
        prelu.PReLU.call = keras.layers.PReLU.call
    keras.mixed_precision.set_global_policy("float32" if precision == "none" else precision)  # as loop.train does
    config = train_config.TrainConfig(
        model_dir="unused", data="synthetic", num_classes=1000, backbone=model, batch_size=pairs,
        mixed_precision=precision, jit_compile=jit_compile,
    )
    strategy = factory.make_strategy("default")
    trainer = factory.build_model(config)
    batches = inputs.train_dataset_fn(config, pairs, epoch=0, skip_steps=0)
    iterator = iter(strategy.distribute_datasets_from_function(lambda context: batches(context).take(1).cache().repeat()))
    step = loop.make_train_step(strategy, trainer, jit_compile=config.jit_compile)
    return lambda: step(iterator)["loss"]


def _keras_insightface_step(checkout, pairs, num_classes=1000):
    """Keras_insightface's MobileFaceNet + NormDense + ArcFace loss under tf_keras, SGD momentum 0.9,
    float32: the step its `model.fit` runs (`make_train_function`), without callbacks."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"  # `tensorflow.keras` is tf_keras (Keras 2), as it needs
    sys.path.insert(0, checkout)
    import numpy as np
    import tensorflow as tf

    import losses  # Keras_insightface's modules
    import models

    keras = tf.keras
    basic_model = models.buildin_models("mobilefacenet", dropout=0, emb_shape=256, output_layer="GDC")
    logits = models.NormDense(num_classes, name="arcface")(basic_model.outputs[0])
    model = keras.models.Model(basic_model.inputs[0], logits)
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), loss=losses.ArcfaceLoss(scale=64))
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2 * pairs, 112, 112, 3)).astype("float32")  # it feeds scaled pixels
    labels = tf.one_hot(rng.integers(0, num_classes, 2 * pairs), num_classes)
    iterator = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
    train_function = model.make_train_function()
    return lambda: train_function(iterator)["loss"]


def _versions():
    import tensorflow as tf

    if os.environ.get("TF_USE_LEGACY_KERAS") == "1":
        import tf_keras

        return f"tensorflow {tf.__version__}, tf_keras {tf_keras.__version__}"
    import keras

    return f"tensorflow {tf.__version__}, keras {keras.__version__}"


def run_worker(spec, warmup):
    """A --compare worker: builds and warms up its step, then times it for each `run SECONDS` line."""
    model, variant, pairs = spec.rsplit(":", 2)  # MODEL may be a Keras_insightface path
    pairs = int(pairs)
    build_start = time.perf_counter()
    if variant == KERAS_INSIGHTFACE:
        step = _keras_insightface_step(model, pairs)
    else:
        step = _xcos_step(model, variant, pairs)
    for _ in range(warmup):
        float(step())
    print("READY " + json.dumps({"versions": _versions(), "warmup_seconds": time.perf_counter() - build_start}), flush=True)
    for line in sys.stdin:
        if not line.startswith("run "):
            break
        min_seconds = float(line.split()[1])
        start, cpu_start, steps = time.perf_counter(), time.process_time(), 0
        while steps < 1 or time.perf_counter() - start < min_seconds:
            loss = float(step())
            steps += 1
        print("RESULT " + json.dumps({
            "steps": steps, "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start,
            "loss": loss,
        }), flush=True)


class _Worker:
    """One variant's worker process; `run` blocks until it has timed one round."""

    def __init__(self, label, spec, images_per_step, warmup):
        self.label, self.images_per_step = label, images_per_step
        self.rounds, self.error, self.info = [], None, {}
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONPATH=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), f"--worker={spec}", f"--warmup={warmup}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )

    def _reply(self, prefix):
        for line in self.process.stdout:
            if line.startswith(prefix):
                return json.loads(line[len(prefix):])
        self.error = self.process.stderr.read()[-2000:]
        return None

    def wait_ready(self):
        self.info = self._reply("READY ") or {}
        return self.error is None

    def run(self, seconds):
        if self.error is not None:
            return
        self.process.stdin.write(f"run {seconds}\n")
        self.process.stdin.flush()
        result = self._reply("RESULT ")
        if result is not None:
            self.rounds.append(result)

    def close(self):
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)

    def totals(self):
        steps = sum(r["steps"] for r in self.rounds)
        seconds = sum(r["seconds"] for r in self.rounds)
        cpu_seconds = sum(r["cpu_seconds"] for r in self.rounds)
        images = steps * self.images_per_step
        return {"images_per_second": images / seconds, "images_per_cpu_second": images / cpu_seconds,
                "per_round": [r["steps"] * self.images_per_step / r["cpu_seconds"] for r in self.rounds]}


def compare_table(model, workers, baseline_label, reference_label=None):
    """Markdown rows of one model's variants with their ratios to the baseline (and reference)."""
    done = {w.label: w.totals() for w in workers if w.rounds}
    ratio_labels = [label for label in (baseline_label, reference_label) if label in done]
    header = "| model | variant | images/step | images/s (wall) | images per CPU-second (per round) |"
    header += "".join(f" vs {label} |" for label in ratio_labels)
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for w in workers:
        if w.label not in done:
            rows.append(f"| {model} | {w.label} | {w.images_per_step} | failed | |" + " |" * len(ratio_labels))
            continue
        t = done[w.label]
        per_round = ", ".join(f"{x:.1f}" for x in t["per_round"])
        row = (f"| {model} | {w.label} | {w.images_per_step} | {t['images_per_second']:.1f} | "
               f"{t['images_per_cpu_second']:.1f} ({per_round}) |")
        for other in ratio_labels:
            row += f" {t['images_per_cpu_second'] / done[other]['images_per_cpu_second']:.2f}x |"
        rows.append(row)
    return rows


def run_compare(models, variants, pairs, rounds, round_seconds, warmup, keras_insightface_dir):
    import tensorflow as tf

    cpu_model, cpu_flags = cpu_info()
    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "avx2", "fma")
    print(f"machine: {cpu_model}, {os.cpu_count()} CPUs; flags: "
          + ", ".join(f"{f} {'yes' if f in cpu_flags else 'no'}" for f in wanted))
    print(f"python {platform.python_version()}, tensorflow {tf.__version__}; load average "
          + " ".join(f"{x:.1f}" for x in os.getloadavg()) + " at start")
    tables = []
    for model in models:
        runnable = []
        for variant in variants:
            reason = skip_reason(variant, cpu_flags)
            if reason:
                print(f"{model} {variant}: skipped, {reason}")
            else:
                runnable.append(variant)
        workers = [_Worker(v, f"{model}:{v}:{pairs[model]}", 2 * pairs[model], warmup) for v in runnable]
        if keras_insightface_dir and model == "mobilefacenet":
            spec = f"{os.path.abspath(keras_insightface_dir)}:{KERAS_INSIGHTFACE}:{pairs[model]}"
            workers.append(_Worker(KERAS_INSIGHTFACE, spec, 2 * pairs[model], warmup))
        elif keras_insightface_dir:
            print(f"{model}: no Keras_insightface counterpart is run (its comparison is MobileFaceNet's)")
        # Built and warmed up at the same time, then only one runs at a time.
        for w in workers:
            if w.wait_ready():
                print(f"{model} {w.label}: ready ({w.info['versions']}; build + warm-up {w.info['warmup_seconds']:.0f} s)")
            else:
                print(f"{model} {w.label}: failed to start\n{w.error}")
        for round_index in range(rounds):
            for w in workers:
                w.run(round_seconds)
            print(f"{model} round {round_index + 1}/{rounds} done; load average {os.getloadavg()[0]:.1f}")
        for w in workers:
            w.close()
            if w.error:
                print(f"{model} {w.label}: failed\n{w.error}")
        table = compare_table(model, workers, "keras_bn", KERAS_INSIGHTFACE if keras_insightface_dir else None)
        print("\n".join(table) + "\n", flush=True)  # each model's table as soon as it is done, all again at the end
        tables += table + [""]
    print("load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()) + " at the end\n")
    print("\n".join(tables))


def _compare_pairs(overrides):
    """--pairs_per_step MODEL=N entries over COMPARE_PAIRS; a bad entry, model or variant is a `cli.UserError`."""
    for name, values, valid in (("models", _ARGS.models.value, COMPARE_PAIRS), ("variants", _ARGS.variants.value, VARIANTS)):
        unknown = sorted(set(values) - set(valid))
        if unknown or not values:
            raise cli.UserError(f"--{name}: unknown or none {unknown}; valid: {', '.join(valid)}")
    if _ARGS.keras_insightface.value and not os.path.isfile(os.path.join(_ARGS.keras_insightface.value, "models.py")):
        raise cli.UserError(f"--keras_insightface_dir: no models.py in {_ARGS.keras_insightface.value!r} (a Keras_insightface checkout)")
    pairs = dict(COMPARE_PAIRS)
    for entry in overrides:
        model, _, count = entry.partition("=")
        if model not in COMPARE_PAIRS or not count.isdigit() or int(count) < 1:
            raise cli.UserError(f"--pairs_per_step: expected MODEL=POSITIVE_INT with MODEL one of {', '.join(COMPARE_PAIRS)}. Received: {entry!r}")
        pairs[model] = int(count)
    return pairs


def main(argv):
    del argv
    if _ARGS.worker.value:
        run_worker(_ARGS.worker.value, _ARGS.warmup.value)
        return
    if _ARGS.compare.value:
        run_compare(_ARGS.models.value, _ARGS.variants.value, _compare_pairs(_ARGS.pairs.value), _ARGS.rounds.value, _ARGS.round_seconds.value,
                    _ARGS.warmup.value, _ARGS.keras_insightface.value)
        return
    if _ARGS.run_case.value:
        print("RESULT " + json.dumps(run_case(_ARGS.run_case.value, _ARGS.min_steps.value, _ARGS.seconds.value, _ARGS.warmup.value, _ARGS.teacher.value)))
        return
    unknown = set(_ARGS.cases.value) - set(CASES)
    if unknown:
        raise cli.UserError(f"--cases: unknown {sorted(unknown)}; valid: {', '.join(CASES)}")
    import tensorflow as tf

    cpu_model, _ = cpu_info()
    print(f"machine: {cpu_model}, {os.cpu_count()} CPUs, {platform.platform()}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print(f"python {platform.python_version()}, tensorflow {tf.__version__}")
    results = []
    for name in _ARGS.cases.value:
        command = [sys.executable, os.path.abspath(__file__), f"--run_case={name}", f"--min_steps={_ARGS.min_steps.value}", f"--seconds={_ARGS.seconds.value}",
                   f"--warmup={_ARGS.warmup.value}", f"--teacher_onnx={_ARGS.teacher.value}"]
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
    _ARGS = define_flags()
    cli.run(main)
