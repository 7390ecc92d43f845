"""Feature cache: written once from face/pair shards, refused when stale, sampled into pairs."""
import os

import numpy as np
import pytest

from common_testing import tiny_backbone
from xcos_tf.data import features, records


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone(input_shape=(112, 112, 3), channels=8)


def test_face_cache_round_trip_and_pairs(tmp_path, backbone):
    shards = records.write_synthetic_shards(tmp_path / "faces", num_shards=2, records_per_shard=12, num_classes=3,
                                            unlabelled_fraction=0.2)
    manifest = features.write_feature_shards(backbone, shards, tmp_path / "cache", progress=False)
    assert manifest["complete"] and manifest["num_records"] == 24
    # One cache file per input shard (so that workers can split it by file), nothing staged left.
    assert [s["records"] for s in manifest["shards"]] == [12, 12]
    assert not (tmp_path / "cache.partial").exists()
    # A second run finds the complete cache and writes nothing.
    assert features.write_feature_shards(backbone, shards, tmp_path / "cache", progress=False) == manifest
    dataset = features.feature_pair_dataset(tmp_path / "cache", batch_size=8, seed=1, deterministic=True)
    batch = next(iter(dataset))
    assert batch["feature_a"].shape == (8,) + backbone.output_shape[1:]
    assert np.all(np.abs(batch["teacher_cos"].numpy()) <= 1.0)
    for side in ("label_a", "label_b"):  # labels 0..2, or -1 for the unlabelled faces
        assert set(batch[side].numpy()) <= {-1, 0, 1, 2}
    # A cached map equals the backbone's output on the face (float16 precision).
    images = next(iter(records_images(shards[0])))
    expected = backbone(images[None], training=False).numpy()[0]
    stored = first_cached_map(tmp_path / "cache")
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3)


def test_stale_cache_is_refused(tmp_path, backbone):
    shards = records.write_synthetic_shards(tmp_path / "faces", num_shards=1, records_per_shard=4, num_classes=2)
    features.write_feature_shards(backbone, shards, tmp_path / "cache", progress=False)
    other = tiny_backbone(input_shape=(112, 112, 3), channels=8)
    with pytest.raises(features.StaleFeatureCacheError, match="backbone"):
        features.write_feature_shards(other, shards, tmp_path / "cache", progress=False)
    with pytest.raises(features.StaleFeatureCacheError):
        features.check_cache(tmp_path / "cache", backbone=other)


def records_images(path):
    import tensorflow as tf

    from xcos_tf.data import pipeline
    return tf.data.TFRecordDataset(str(path)).map(lambda s: pipeline.decode_image(records.decode_face(s)["image_encoded"]))


def first_cached_map(cache_dir):
    import tensorflow as tf
    manifest = features.check_cache(cache_dir)
    path = str(cache_dir / manifest["shards"][0]["file"])
    parse = features._face_parser(tuple(manifest["feature_shape"]))
    record = parse(next(iter(tf.data.TFRecordDataset(path))))
    return features.parse_map(record["map"], tuple(manifest["feature_shape"])).numpy()


def test_pair_cache_computes_each_face_once(tmp_path, backbone):
    import cv2

    from xcos_tf.data import align
    rng = np.random.default_rng(0)
    faces = [align.encode_image(cv2.resize(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8), (112, 112)), "png")
             for _ in range(3)]
    embedding = np.eye(4, dtype=np.float32)
    pairs = [(0, 1, False), (0, 2, False), (1, 1, True)]
    serialized = [records.encode_pair_example(faces[a], faces[b], "png", same, i % 2, f"p{a}", f"p{b}",
                                              f"face{a}.png", f"face{b}.png", embedding[a], embedding[b])
                  for i, (a, b, same) in enumerate(pairs)]
    (tmp_path / "pairs").mkdir()
    records.write_shard(tmp_path / "pairs" / "pairs-00000.tfrecord", serialized)
    features.write_feature_shards(backbone, tmp_path / "pairs", tmp_path / "cache", kind="pairs", progress=False)
    loaded = features.eval_feature_pairs(tmp_path / "cache")
    assert loaded["map_a"].shape == (3,) + backbone.output_shape[1:]
    np.testing.assert_array_equal(loaded["is_same"], [False, False, True])
    np.testing.assert_allclose(loaded["teacher_cos"], [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(loaded["map_a"][0], loaded["map_a"][1])  # face 0 twice, one map
    np.testing.assert_array_equal(loaded["map_b"][2], loaded["map_a"][2])


def test_cache_is_cut_at_every_source_shard_end():
    assert features.shard_ends([2500, 0, 3]) == [1000, 2000, 2500, 2503]
    assert features.shard_ends([12, 12], records_per_shard=5) == [5, 10, 12, 17, 22, 24]


def _cached_maps(cache):
    import tensorflow as tf

    files, parse = features.cached_face_maps([str(cache)])
    return np.stack([parse(record).numpy() for record in tf.data.TFRecordDataset(files)])


def test_a_killed_writer_resumes_from_the_staging_folder(tmp_path, backbone, monkeypatch):
    shards = records.write_synthetic_shards(tmp_path / "faces", num_shards=3, records_per_shard=4, num_classes=2)
    expected = features.write_feature_shards(backbone, shards, tmp_path / "fresh", batch_size=5, progress=False)
    assert [s["records"] for s in expected["shards"]] == [4, 4, 4]  # batches of 5 span the shard ends
    written = []
    real_write_shard = records.write_shard

    def write_two_then_die(path, serialized):
        if len(written) == 2:
            raise KeyboardInterrupt  # a kill between two cache files
        written.append(path)
        return real_write_shard(path, serialized)

    monkeypatch.setattr(records, "write_shard", write_two_then_die)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        features.write_feature_shards(backbone, shards, cache, batch_size=5, progress=False)
    # Nothing in place yet: the cache folder has no manifest for a reader to take as complete.
    assert features.planned_file_count(cache, [4, 4, 4]) == 3 and records.read_manifest(cache) is None
    assert records.read_manifest(features.staging_dir(cache))["num_records"] == 8
    monkeypatch.setattr(records, "write_shard", real_write_shard)
    resumed = features.write_feature_shards(backbone, shards, cache, batch_size=5, progress=False)
    # The two files written before the kill are kept as they are; the third is computed in
    # other batches than in the fresh run (records 8-11 at once instead of 8-9 with 5-7 and
    # 10-11 alone), and the convolution kernels for another batch size may round the last bit
    # differently, which float16 storage can turn into another byte: its maps must agree to
    # float16 precision.
    assert [s["sha256"] for s in resumed["shards"][:2]] == [s["sha256"] for s in expected["shards"][:2]]
    assert [s["records"] for s in resumed["shards"]] == [4, 4, 4]
    np.testing.assert_allclose(_cached_maps(cache), _cached_maps(tmp_path / "fresh"), rtol=2e-3, atol=2e-3)
    assert sorted(p.name for p in cache.iterdir()) == [s["file"] for s in resumed["shards"]] + ["manifest.json"]
    assert not os.path.exists(features.staging_dir(cache))


def test_a_single_file_cache_of_an_earlier_version_is_used_as_it_is(tmp_path, backbone, monkeypatch):
    shards = records.write_synthetic_shards(tmp_path / "faces", num_shards=2, records_per_shard=4, num_classes=2)
    monkeypatch.setattr(features, "shard_ends", lambda counts: [sum(counts)])  # the old cut: 1000 records
    old = features.write_feature_shards(backbone, shards, tmp_path / "cache", progress=False)
    monkeypatch.undo()
    assert len(old["shards"]) == 1 and features.planned_file_count(tmp_path / "cache", [4, 4]) == 1
    assert features.write_feature_shards(backbone, shards, tmp_path / "cache", progress=False) == old
    assert features.planned_file_count(tmp_path / "new", [4, 4]) == 2


def test_wait_for_cache_returns_the_manifest_or_names_a_lost_writer(tmp_path, backbone):
    shards = records.write_synthetic_shards(tmp_path / "faces", num_shards=1, records_per_shard=4, num_classes=2)
    with pytest.raises(features.CacheWriterLostError, match="stopped before it was complete; start the job again"):
        features.wait_for_cache(tmp_path / "cache", writer_alive=lambda: False, poll_seconds=0.01)
    os.makedirs(features.staging_dir(tmp_path / "cache"))
    with pytest.raises(features.CacheWriterLostError, match="got no new bytes in 0 s"):
        features.wait_for_cache(tmp_path / "cache", writer_alive=lambda: True, poll_seconds=0.01, stall_seconds=0.05)
    manifest = features.write_feature_shards(backbone, shards, tmp_path / "cache", progress=False)
    assert features.wait_for_cache(tmp_path / "cache", writer_alive=lambda: False) == manifest
