"""Multi-worker training on loopback: two processes of the real trainer
(`python -m xcos_tf.train --strategy=multi_worker`), each with its own TF_CONFIG, on tiny face
shards. Both finish, only the chief writes into --model_dir, the workers read disjoint shard
files, the losses equal a one-process run fed the same per-replica batches, and a job whose
worker is killed with SIGKILL resumes from the last checkpoint when it is started again.

What "the same data" means here: worker i reads shard files i, i + 2, ... (sharding by file),
so no single input pipeline over all files yields the same batches. The reference is the
trainer's own building blocks (`build_model`, `train_dataset_fn`, `make_train_step`) under
`MirroredStrategy` on 2 logical CPUs with one input pipeline per replica
(`InputReplicationMode.PER_REPLICA`): replica i gets the input context of worker i, hence the
same files, the same per-replica batch and the same batch-norm statistics. Only the transport of
the all-reduce differs (gRPC between processes versus in-process copies).
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import tensorflow as tf

from common_testing import REPO_ROOT, TINY_BACKBONE_SPEC as TINY_BACKBONE
from training_testing import checkpoint_counters, run_python
from xcos_tf.data import records
from xcos_tf.training import run_folder

IMAGE_SHAPE = (32, 32, 3)

NUM_SHARDS = 4
BATCH_SIZE = 8  # pairs per replica: 2 workers x 1 replica = a global batch of 16 pairs
TIMEOUT = 300  # seconds for one job; a stuck collective never hangs the suite
# Measured on this machine: equal to float32 printing precision (7 digits).
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 shard files of 16 faces (4 identities, 32x32) with teacher embeddings."""
    root = tmp_path_factory.mktemp("faces")
    return sorted(records.write_synthetic_shards(str(root), num_shards=NUM_SHARDS, records_per_shard=16,
                                                 num_classes=4, image_shape=IMAGE_SHAPE))


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _train_command(shards, model_dir, train_steps, checkpoint_every, export_formats="", extra_flags=()):
    return [
        sys.executable, "-m", "xcos_tf.train", "--strategy=multi_worker",
        f"--train_shards={os.path.dirname(shards[0])}/*.tfrecord", f"--image_size={IMAGE_SHAPE[0]}",
        f"--backbone={TINY_BACKBONE}", f"--batch_size={BATCH_SIZE}", f"--train_steps={train_steps}",
        "--learning_rate=0.05", f"--checkpoint_every={checkpoint_every}", "--keep_checkpoints=100", "--log_every=1",
        "--deterministic", "--shuffle_buffer=32", f"--export_formats={export_formats}", f"--model_dir={model_dir}",
        *extra_flags,  # absl: a flag given again takes the last value
    ]


def _stage1_flags(onnx_path):
    """The shipped stage-1 recipe (xcos_tf/configs/local_mobilefacenet.flags) in miniature: an
    imported ONNX body, frozen, its maps cached; grid head and learned symmetric attention
    trained on the teacher cosine only."""
    return [
        f"--init_backbone=onnx:{onnx_path}", "--freeze_backbone", "--cache_backbone_features", "--grid_channels=8",
        "--attention=learned", "--symmetric", "--ce_weight=0", "--xcos_weight=1.0", "--optimizer=adamw",
        "--learning_rate=3e-3", "--weight_decay=0", "--attention_optimizer=adam", "--attention_learning_rate=3e-3",
        "--lr_schedule=cosine",
    ]


@pytest.fixture(scope="module")
def tiny_onnx_body(tmp_path_factory):
    import onnx
    from tiny_onnx_tails import tiny_face_model

    path = tmp_path_factory.mktemp("onnx") / "tiny_face_model.onnx"
    onnx.save(tiny_face_model(), str(path))
    return path


class _Job:
    """Two worker processes of one command, each in its own process group, logs in files."""

    def __init__(self, command, log_dir, name, ports):
        cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
        self.logs = [os.path.join(log_dir, f"{name}_worker{index}.log") for index in range(2)]
        self.processes = []
        for index, log in enumerate(self.logs):
            tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO_ROOT), TF_CONFIG=json.dumps(tf_config))
            with open(log, "w") as out:
                self.processes.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out,
                                                       stderr=subprocess.STDOUT, start_new_session=True))

    def wait(self, timeout=TIMEOUT):
        deadline = time.time() + timeout
        return [process.wait(timeout=max(deadline - time.time(), 1)) for process in self.processes]

    def kill(self, index):
        if self.processes[index].poll() is None:
            os.killpg(self.processes[index].pid, signal.SIGKILL)
        self.processes[index].wait()

    def log(self, index):
        with open(self.logs[index]) as f:
            return f.read()


@pytest.fixture
def start_job(tmp_path):
    """`start_job(command, name, ports=None) -> _Job`; every worker's process group is killed at
    teardown, also when the test fails."""
    jobs = []

    def start(command, name, ports=None):
        jobs.append(_Job(command, tmp_path, name, ports or _free_ports(2)))
        return jobs[-1]

    yield start
    for job in jobs:
        for index in range(2):
            job.kill(index)


def _losses_by_run(log_dir):
    """[{step: loss}] of `train/loss`, one dict per event file (one per run of the chief)."""
    runs = []
    for name in sorted(os.listdir(log_dir), key=lambda n: os.path.getmtime(os.path.join(log_dir, n))):
        losses = {}
        for event in tf.compat.v1.train.summary_iterator(os.path.join(log_dir, name)):
            for value in event.summary.value:
                if value.tag == "train/loss":
                    losses[event.step] = float(tf.make_ndarray(value.tensor))
        runs.append(losses)
    return runs


def _files_read(log):
    """{shard path} of the 'Input pipeline i of n reads ...' lines of a worker's log."""
    lines = re.findall(r"Input pipeline (\d) of 2 reads \d+ of \d+ shard files: (.*)", log)
    assert lines, "no input pipeline line in the worker's log"
    return {int(pipeline_id) for pipeline_id, _ in lines}, {path for _, paths in lines for path in paths.split(", ")}


def _worker_temp_dir(log):
    """The local temporary folder that a non-chief worker logged; it must be in the system's."""
    (worker_dir,) = re.findall(r"this worker's saves go to (\S+) \(deleted", log)
    assert os.path.commonpath([worker_dir, tempfile.gettempdir()]) == tempfile.gettempdir()
    return worker_dir


def _checkpoint_steps(model_dir):
    state = tf.train.get_checkpoint_state(os.path.join(model_dir, "checkpoints"))
    return [int(path.rsplit("-", 1)[1]) for path in state.all_model_checkpoint_paths]


def test_two_workers_train_like_one_process_and_only_the_chief_writes(tmp_path, shards, start_job):
    model_dir = tmp_path / "run"
    job = start_job(_train_command(shards, model_dir, train_steps=6, checkpoint_every=3, export_formats="saved_model"),
                    "train")
    codes = job.wait()
    assert codes == [0, 0], job.log(0)[-3000:] + job.log(1)[-3000:]
    chief_log, worker_log = job.log(0), job.log(1)
    for log in (chief_log, worker_log):
        assert "Starting at step 0: 2 replica(s), global batch 16 pairs." in log

    # The chief writes the run; worker 1 wrote only into a local temporary folder, now deleted.
    assert sorted(os.listdir(model_dir)) == ["best.keras", "checkpoints", "export", "final.keras", "logs", "params.json"]
    assert _checkpoint_steps(model_dir) == [3, 6]
    assert os.path.isfile(model_dir / "export" / "manifest.json")
    assert tf.saved_model.contains_saved_model(next((model_dir / "export" / "saved_model").glob("*/1")))
    assert not os.path.exists(_worker_temp_dir(worker_log))
    assert "this worker's saves go to" not in chief_log

    # Sharding by file: the two workers read disjoint files that together are all of them.
    chief_ids, chief_files = _files_read(chief_log)
    worker_ids, worker_files = _files_read(worker_log)
    assert (chief_ids, worker_ids) == ({0}, {1})
    assert not chief_files & worker_files
    assert chief_files | worker_files == set(shards)

    # The reference: the same config (the chief's params.json) on 2 replicas in one process,
    # replica i reading with worker i's input context.
    reference = _reference_losses(model_dir)
    (two_workers,) = _losses_by_run(model_dir / "logs")
    assert sorted(two_workers) == list(range(1, 7))
    assert [two_workers[step] for step in range(1, 7)] == pytest.approx(reference, rel=LOSS_RTOL)


def _reference_losses(model_dir):
    """The losses of the run's config (the chief's params.json) on 2 replicas of one process,
    replica i reading with worker i's input context (and the chief's feature caches, if any)."""
    script = textwrap.dedent(f"""
        import json
        import keras
        import tensorflow as tf
        from xcos_tf.training import config as train_config, factory, inputs, loop
        config = train_config.TrainConfig.from_json({str(model_dir / "params.json")!r})
        factory.configure_cpu_devices(2)
        strategy = factory.make_strategy("mirrored")
        keras.utils.set_random_seed(config.seed)
        with strategy.scope():
            trainer = factory.build_model(config, strategy.num_replicas_in_sync)
        # Complete caches are checked and returned as they are: the chief's, not new ones.
        caches = inputs.feature_caches(config, trainer.backbone) if config.cache_backbone_features else None
        per_replica = tf.distribute.InputOptions(experimental_replication_mode=tf.distribute.InputReplicationMode.PER_REPLICA)
        dataset_fn = inputs.train_dataset_fn(config, config.batch_size * strategy.num_replicas_in_sync, 0, 0, caches)
        iterator = iter(strategy.distribute_datasets_from_function(dataset_fn, per_replica))
        train_step = loop.make_train_step(strategy, trainer, on_feature_maps=bool(caches))
        print("LOSSES", json.dumps([float(train_step(iterator)["loss"]) for _ in range(config.train_steps)]))
    """)
    result = run_python(["-c", script])
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("LOSSES"))[len("LOSSES"):])


def test_two_workers_on_cached_features_of_a_frozen_onnx_body(tmp_path, shards, tiny_onnx_body, start_job):
    """Stage 1 of the shipped recipe on two workers: the chief alone computes the feature cache
    (one file per input shard), worker 1 waits for it, each reads its own cache files."""
    model_dir = tmp_path / "run"
    stale_worker_dir = tempfile.mkdtemp(prefix=f"{run_folder.WORKER_DIR_PREFIX}{_dead_pid()}_")
    job = start_job(_train_command(shards, model_dir, train_steps=4, checkpoint_every=2,
                                   extra_flags=_stage1_flags(tiny_onnx_body)), "cached")
    codes = job.wait()
    assert codes == [0, 0], job.log(0)[-3000:] + job.log(1)[-3000:]
    chief_log, worker_log = job.log(0), job.log(1)
    assert "Computing the feature cache" in chief_log and "Computing the feature cache" not in worker_log
    assert "waits for the chief's feature cache" in worker_log

    # Only the chief's files remain: the run, and the cache in it, cut at every input shard's end.
    assert sorted(os.listdir(model_dir)) == ["best.keras", "checkpoints", "feature_cache", "final.keras", "logs",
                                             "params.json"]
    (cache,) = os.listdir(model_dir / "feature_cache")
    manifest = records.read_manifest(model_dir / "feature_cache" / cache)
    assert manifest["complete"] and [s["records"] for s in manifest["shards"]] == [16] * NUM_SHARDS
    assert sorted(os.listdir(model_dir / "feature_cache" / cache)) == sorted(
        [s["file"] for s in manifest["shards"]] + ["manifest.json"])
    assert not os.path.exists(_worker_temp_dir(worker_log))
    # The dead process's temporary folder was swept at the start; a live one's is never touched.
    assert not os.path.exists(stale_worker_dir)

    # Worker i reads cache files i, i + 2: disjoint, all four.
    chief_ids, chief_files = _files_read(chief_log)
    worker_ids, worker_files = _files_read(worker_log)
    assert (chief_ids, worker_ids) == ({0}, {1}) and not chief_files & worker_files
    assert {os.path.basename(f) for f in chief_files | worker_files} == {s["file"] for s in manifest["shards"]}

    (two_workers,) = _losses_by_run(model_dir / "logs")
    assert [two_workers[step] for step in range(1, 5)] == pytest.approx(_reference_losses(model_dir), rel=LOSS_RTOL)


def test_a_feature_cache_that_cannot_be_split_is_refused_before_any_work(tmp_path, shards, start_job):
    """A complete cache in one file (as an earlier version wrote it) cannot feed two workers:
    both exit 2 with one line naming the cache, before building or computing anything."""
    model_dir = tmp_path / "run"
    cache = model_dir / "feature_cache" / f"00_{os.path.basename(os.path.dirname(shards[0]))}"
    os.makedirs(cache)
    records.write_shard(cache / "features-00000.tfrecord", [b""])
    records.write_json_atomic(cache / "manifest.json", {"complete": True, "shards": [{"file": "features-00000.tfrecord"}]})
    job = start_job(_train_command(shards, model_dir, 2, 2, extra_flags=["--freeze_backbone", "--cache_backbone_features"]),
                    "refused")
    assert job.wait() == [2, 2], job.log(0)[-3000:]
    for index in range(2):
        (line,) = [line for line in job.log(index).splitlines() if line.startswith("error:")]
        assert f"--cache_backbone_features cannot split its feature caches by file over 2 workers: {cache} holds 1 file(s)" in line
        assert f"; delete {cache} so that it is written again in more files" in line
        assert "Traceback" not in job.log(index)
    assert sorted(os.listdir(model_dir)) == ["feature_cache"]  # not even params.json


def _dead_pid():
    """The id of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_killed_worker_and_a_restarted_job_resume_from_the_last_checkpoint(tmp_path, shards, start_job):
    model_dir = tmp_path / "run"
    train_steps, checkpoint_every = 40, 5
    command = _train_command(shards, model_dir, train_steps, checkpoint_every)
    ports = _free_ports(2)
    first = start_job(command, "first", ports)
    deadline = time.time() + TIMEOUT
    while not (model_dir / "checkpoints" / f"ckpt-{2 * checkpoint_every}.index").exists():
        assert all(p.poll() is None for p in first.processes), first.log(0)[-3000:] + first.log(1)[-3000:]
        assert time.time() < deadline, "no checkpoint appeared in time"
        time.sleep(0.05)
    first.kill(1)
    shutil.rmtree(_worker_temp_dir(first.log(1)), ignore_errors=True)  # what a kill -9 leaves, outside --model_dir
    # The chief notices the lost peer (its heartbeats stop) and fails by itself, as a job
    # manager expects before it restarts the job.
    assert first.wait(timeout=120)[0] != 0
    assert "UnavailableError" in first.log(0)
    saved_step, _ = checkpoint_counters(model_dir)
    assert 2 * checkpoint_every <= saved_step < train_steps

    second = start_job(command, "second", ports)  # the same command lines and TF_CONFIG
    codes = second.wait()
    assert codes == [0, 0], second.log(0)[-3000:] + second.log(1)[-3000:]
    for index in range(2):
        assert f"Resuming at step {saved_step}: 2 replica(s)" in second.log(index)
    # Every optimizer applied exactly one update per step: nothing ran twice, nothing was lost.
    step, iterations = checkpoint_counters(model_dir)
    assert step == train_steps and iterations and all(i == train_steps for i in iterations)
    # One checkpoint every 5 steps, none twice; the restarted run logged steps from the resume point on.
    assert _checkpoint_steps(model_dir) == list(range(checkpoint_every, train_steps + 1, checkpoint_every))
    assert sorted(_losses_by_run(model_dir / "logs")[-1]) == list(range(saved_step + 1, train_steps + 1))
    # Nothing of the killed worker in the model folder.
    assert sorted(os.listdir(model_dir)) == ["best.keras", "checkpoints", "final.keras", "logs", "params.json"]
