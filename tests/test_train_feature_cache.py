"""xcos_tf.train --cache_backbone_features: a frozen backbone runs once, training uses its cached maps."""
import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import types

import pytest

from common_testing import TINY_BACKBONE_SPEC
from xcos_tf.training import config as train_config, inputs, loop, run_folder
from xcos_tf.data import features, records


def _config(tmp_path, **overrides):
    shards = records.write_synthetic_shards(tmp_path / "shards", num_shards=2, records_per_shard=12, num_classes=3)
    values = dict(model_dir=str(tmp_path / "run"), train_shards=(str(tmp_path / "shards" / "*.tfrecord"),),
                  backbone=TINY_BACKBONE_SPEC, freeze_backbone=True, cache_backbone_features=True,
                  train_steps=4, batch_size=4, steps_per_epoch=2, export_formats=(), checkpoint_every=2, log_every=2)
    values.update(overrides)
    assert shards
    return train_config.TrainConfig(**values)


def test_training_on_cached_features(tmp_path):
    config = _config(tmp_path)
    history = loop.train(config)
    assert history["step"][-1] == 4
    cache = os.path.join(config.model_dir, "feature_cache", "00_shards")
    assert features.check_cache(cache, kind="faces")["num_records"] == 24
    assert os.path.isfile(os.path.join(config.model_dir, run_folder.FINAL_MODEL))


def test_cache_needs_a_frozen_backbone(tmp_path):
    with pytest.raises(train_config.ConfigError, match="--cache_backbone_features needs --freeze_backbone"):
        _config(tmp_path, freeze_backbone=False).validate()


def test_shards_or_caches_that_cannot_be_split_over_the_workers_are_refused_up_front(tmp_path):
    config = _config(tmp_path)  # 2 input shards of 12 faces: a new cache gets 2 files
    assert inputs.resolve_data(config, num_input_pipelines=2).num_classes == 3
    with pytest.raises(train_config.ConfigError, match=r"^--cache_backbone_features cannot split its feature caches by "
                       r"file over 3 workers: .*00_shards holds 2 file\(s\) \(one per input shard, at most 1000 faces "
                       r"each\); write more, smaller input shards \(make_shards --shard_mb\)"):
        inputs.resolve_data(config, num_input_pipelines=3)
    with pytest.raises(train_config.ConfigError, match=r"^--train_shards hold 2 shard file\(s\), which cannot be split "
                       r"by file over 3 workers; write more, smaller shards"):
        inputs.resolve_data(dataclasses.replace(config, cache_backbone_features=False), num_input_pipelines=3)
    assert not os.path.exists(config.model_dir)  # nothing written, nothing computed


def test_non_chief_temporary_folders_go_on_errors_and_after_kills(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tempfile.tempdir)
    config = _config(tmp_path)
    monkeypatch.setattr(loop, "is_chief", lambda strategy: False)

    def crash(*args, **kwargs):
        assert len(os.listdir(tempfile.tempdir)) == 1  # this worker's folder exists while it trains
        raise RuntimeError("crash while building the model")

    monkeypatch.setattr(loop, "build_model", crash)
    with pytest.raises(RuntimeError, match="crash while building"):
        loop.train(config)
    assert os.listdir(tempfile.tempdir) == []
    # A worker killed with -9 leaves its folder; the next start on the machine removes it, and
    # only it: a live process's folder stays.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tempfile.mkdtemp(prefix=f"{run_folder.WORKER_DIR_PREFIX}{dead.pid}_")
    live = tempfile.mkdtemp(prefix=f"{run_folder.WORKER_DIR_PREFIX}{os.getppid()}_")
    assert run_folder.sweep_worker_dirs() == [stale]
    assert os.listdir(tempfile.tempdir) == [os.path.basename(live)]


def test_chief_alive_asks_the_chief_address_of_the_cluster():
    """A waiting worker's liveness check: the chief's TF_CONFIG address accepts connections."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    cluster = {"worker": [address, "127.0.0.1:1"]}
    strategy = types.SimpleNamespace(cluster_resolver=types.SimpleNamespace(
        cluster_spec=lambda: types.SimpleNamespace(as_dict=lambda: cluster), task_type="worker"))
    alive = inputs.chief_alive(strategy)
    assert alive() and inputs.num_input_pipelines(strategy) == 2
    server.close()
    assert not alive()
