"""xcos_tf.train --cache_backbone_features: a frozen backbone runs once, training uses its cached maps."""
import os

import pytest

from common_testing import TINY_BACKBONE_SPEC
from xcos_tf.training import config as train_config, loop, run_folder
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
