"""Occlusion training (--occlusion_fraction, --occlusion_weight): random occluders, the cache of
occluded faces (their maps and the teacher's embeddings of them), the pairs whose face B is
occluded, the per-cell loss, and a tiny run, on a tiny ONNX face model that is body and teacher."""
import dataclasses
import os

import numpy as np
import onnx
import pytest
import tensorflow as tf

import tiny_onnx_tails
from xcos_tf import backbones, occlusion
from xcos_tf import model as xcos_model
from xcos_tf.data import features, occluded_features, records
from xcos_tf.teacher import Teacher
from xcos_tf.training import config as train_config, inputs, loop

CELLS = (4, 4)  # the tiny model's grid on a 112 face


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny_gdconv_112.onnx"
    onnx.save(tiny_onnx_tails.tiny_face_model_112(), str(path))
    return path


def _shards(folder, onnx_path, **kwargs):
    """Synthetic face shards whose manifest names the tiny ONNX model as their teacher (their
    stored clean embeddings stay random: these tests check the occluded ones)."""
    records.write_synthetic_shards(str(folder), embedding_dim=tiny_onnx_tails.EMBEDDING, **kwargs)
    manifest = records.read_manifest(str(folder))
    manifest["teacher"] = dict(Teacher(onnx_path).get_config(), dim=tiny_onnx_tails.EMBEDDING,
                               sha256=records.sha256_file(str(onnx_path)))
    records.write_json_atomic(os.path.join(folder, records.MANIFEST_NAME), manifest)
    return sorted(str(p) for p in folder.glob("*.tfrecord"))


@pytest.fixture(scope="module")
def occluded_cache(tmp_path_factory, onnx_path):
    root = tmp_path_factory.mktemp("occluded")
    files = _shards(root / "faces", onnx_path, num_shards=2, records_per_shard=10, num_classes=3)
    body = backbones.from_onnx(str(onnx_path), input_shape=(112, 112, 3))
    teacher = occluded_features.shards_teacher(str(onnx_path), files)
    extra = occluded_features.OccludedFaces(teacher, seed=3)
    features.write_feature_shards(body, files, root / "cache", batch_size=7, progress=False, extra=extra)
    return root / "cache", files, body, teacher, extra


def _faces(files):
    """The shards' faces in record order, uint8, and their teacher embeddings."""
    faces = [records.decode_face(s) for path in files for s in tf.data.TFRecordDataset(path)]
    images = np.stack([tf.io.decode_image(f["image_encoded"], channels=3).numpy() for f in faces])
    return images, np.stack([f["teacher_embedding"].numpy() for f in faces])


def _cache_records(cache):
    manifest = features.check_cache(cache, kind="faces")
    shape = tuple(manifest["feature_shape"])
    parse = occluded_features.OcclusionSampler(cache, 1.0).parse
    rows = [parse(s) for entry in manifest["shards"] for s in tf.data.TFRecordDataset(os.path.join(cache, entry["file"]))]
    return {
        "map": np.stack([features.parse_map(r["occluded_map"], shape).numpy() for r in rows]),
        "teacher_embedding": np.stack([r["occluded_teacher_embedding"].numpy() for r in rows]),
        "coverage": np.stack([r["occluded_coverage"].numpy().reshape(shape[:2]) for r in rows]),
    }


def test_training_occluders_vary_and_paste_one_colour_block():
    face = np.full((112, 112, 3), 90, np.uint8)
    masks = []
    for seed in range(60):
        occluded, mask = occlusion.training_occlusion(face, np.random.default_rng(seed))
        assert mask.any() and not mask.all()
        assert (occluded[~mask] == 90).all()  # nothing outside the mask changes
        assert len(np.unique(occluded[mask].reshape(-1, 3), axis=0)) == 1  # one colour inside
        again, same_mask = occlusion.training_occlusion(face, np.random.default_rng(seed))
        assert (again == occluded).all() and (same_mask == mask).all()
        masks.append(mask)
    masks = np.stack(masks)
    eye_row = int(occlusion.align.TEMPLATE_112[0][1])
    full_width = masks.all(axis=2).any(axis=1)  # bands across the whole face
    assert full_width.sum() >= 10 and masks[full_width, eye_row].all()  # every band covers the eye line
    assert masks[:, -1].any(axis=1).sum() >= 10  # lower-face blocks reach the chin
    assert len({m.sum() for m in masks}) > 30  # places and sizes vary


def test_occluded_cache_holds_the_backbone_and_teacher_of_the_occluded_faces(occluded_cache):
    cache, files, body, teacher, extra = occluded_cache
    manifest = features.check_cache(cache, kind="faces")
    assert manifest["extra"]["occlusion_seed"] == 3 and manifest["num_records"] == 20
    faces, clean_embeddings = _faces(files)
    occluded, masks = extra.occlude(faces, 0)  # record i draws its occluder from (seed, i)
    stored = _cache_records(cache)
    np.testing.assert_allclose(stored["map"], np.asarray(body(occluded.astype(np.float32))), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(stored["teacher_embedding"], teacher.embed(occluded), atol=1e-5)
    np.testing.assert_allclose(stored["coverage"], np.stack([occlusion.cell_coverage(m, CELLS) for m in masks]))
    # The occluded faces really differ from the clean ones, in the maps and in the teacher's eyes.
    clean_maps = np.asarray(body(faces.astype(np.float32)))
    assert np.abs(stored["map"] - clean_maps).reshape(20, -1).max(axis=1).min() > 1e-2
    assert np.abs(np.sum(stored["teacher_embedding"] * teacher.embed(faces), axis=1)).max() < 1 - 1e-4
    # The cache is still a plain face cache: its clean records are the clean cache's.
    assert manifest["num_classes"] == 3 and clean_embeddings.shape == (20, tiny_onnx_tails.EMBEDDING)


def _pairs(cache, fraction, batches=6):
    sampler = occluded_features.OcclusionSampler(cache, fraction)
    dataset = features.feature_pair_dataset(cache, batch_size=8, seed=5, deterministic=True, flip=False,
                                            shuffle_buffer=20, occlusion=sampler)
    return [{k: v.numpy() for k, v in batch.items()} for batch in dataset.take(batches)]


def test_occluded_pairs_carry_the_teacher_cosine_of_the_occluded_pair(occluded_cache, onnx_path):
    cache, files, body, teacher, extra = occluded_cache
    stored = _cache_records(cache)
    faces, clean_embeddings = _faces(files)
    clean_maps = np.asarray(body(faces.astype(np.float32)))

    def index_of(feature_map, maps):
        distances = np.abs(maps - feature_map).reshape(len(maps), -1).max(axis=1)
        return int(np.argmin(distances)), float(np.min(distances))

    for batch in _pairs(cache, 1.0):
        assert (batch["coverage_b"].reshape(8, -1).max(axis=1) > 0).all()
        for i in range(8):
            b, distance = index_of(batch["feature_b"][i], stored["map"])
            assert distance < 1e-6  # face B is an occluded face of the cache
            np.testing.assert_allclose(batch["coverage_b"][i], stored["coverage"][b])
            a, distance = index_of(batch["feature_a"][i], clean_maps)
            assert distance < 2e-2  # face A is clean
            expected = np.sum(clean_embeddings[a] * stored["teacher_embedding"][b])
            np.testing.assert_allclose(batch["teacher_cos"][i], expected, atol=1e-5)
    clean = [batch for batch in _pairs(cache, 1e-9)]
    assert all((batch["coverage_b"] == 0).all() for batch in clean)
    mixed = np.concatenate([batch["coverage_b"].reshape(8, -1).max(axis=1) > 0 for batch in _pairs(cache, 0.5, 10)])
    assert 0.25 < mixed.mean() < 0.75


def test_a_cache_without_occluded_faces_and_another_teacher_are_refused(tmp_path, onnx_path, occluded_cache):
    files = _shards(tmp_path / "faces", onnx_path, num_shards=1, records_per_shard=4, num_classes=2)
    body = backbones.from_onnx(str(onnx_path), input_shape=(112, 112, 3))
    features.write_feature_shards(body, files, tmp_path / "clean", progress=False)
    with pytest.raises(ValueError, match="holds no occluded faces"):
        occluded_features.OcclusionSampler(tmp_path / "clean", 0.5)
    other = tmp_path / "other.onnx"
    onnx.save(tiny_onnx_tails.tiny_face_model("gdconv", seed=1), str(other))
    with pytest.raises(ValueError, match="is not the teacher that embedded the training shards"):
        occluded_features.shards_teacher(str(other), files)


def test_ranking_loss_by_hand():
    cos = np.full((3, 2, 2), 0.5, np.float32)
    coverage = np.zeros((3, 2, 2), np.float32)
    coverage[:, 0, 0] = 1.0  # the occluded cell
    cos[0, 0, 0] = 0.1  # lowest already, by more than the margin: no loss
    cos[1, 0, 0] = 0.48  # lowest by too little
    cos[2, 1, 1] = 0.2  # another cell is lowest
    same = np.array([True, True, True])
    loss = float(xcos_model.occlusion_ranking_loss(cos, coverage, same))
    expected = (0 + (xcos_model.OCCLUSION_MARGIN - 0.02) + (xcos_model.OCCLUSION_MARGIN + 0.3)) / 3
    assert loss == pytest.approx(expected, abs=1e-6)
    # Different-person pairs and clean faces count for nothing.
    assert float(xcos_model.occlusion_ranking_loss(cos, coverage, ~same)) == 0.0
    assert float(xcos_model.occlusion_ranking_loss(cos, np.zeros_like(coverage), same)) == 0.0


def _config(tmp_path, onnx_path, **overrides):
    files = _shards(tmp_path / "faces", onnx_path, num_shards=2, records_per_shard=12, num_classes=3)
    values = dict(
        model_dir=str(tmp_path / "run"), train_shards=(os.path.join(os.path.dirname(files[0]), "*.tfrecord"),),
        init_backbone=f"onnx:{onnx_path}", freeze_backbone=True, cache_backbone_features=True,
        grid_head="positionwise", grid_init="teacher_tail", grid_channels=0, attention_prior=True, ce_weight=0.0,
        batch_size=8, train_steps=4, steps_per_epoch=2, checkpoint_every=2, log_every=2, optimizer="adam",
        learning_rate=1e-2, deterministic=True, shuffle_buffer=32, export_formats=(),
        occlusion_fraction=0.5, occlusion_weight=1.0,
    )
    values.update(overrides)
    return train_config.TrainConfig(**values)


def test_tiny_occlusion_run(tmp_path, onnx_path):
    config = _config(tmp_path, onnx_path)
    history = loop.train(config)
    assert history["step"] == [1, 2, 3, 4]
    assert np.all(np.isfinite(history["occlusion_loss"])) and np.all(np.isfinite(history["loss"]))
    cache = os.path.join(config.model_dir, "feature_cache", "00_faces_occluded")
    assert features.check_cache(cache, kind="faces")["extra"]["occlusion_seed"] == config.seed


def test_occlusion_flags_are_checked(tmp_path, onnx_path):
    config = _config(tmp_path, onnx_path)
    with pytest.raises(train_config.ConfigError, match="^--occlusion_fraction needs --cache_backbone_features"):
        dataclasses.replace(config, cache_backbone_features=False, freeze_backbone=False).validate()
    with pytest.raises(train_config.ConfigError, match="^--occlusion_weight needs --occlusion_fraction > 0"):
        dataclasses.replace(config, occlusion_fraction=0.0).validate()
    other = tmp_path / "other.onnx"
    onnx.save(tiny_onnx_tails.tiny_face_model("gdconv", seed=1), str(other))
    with pytest.raises(train_config.ConfigError, match="^--occlusion_teacher cannot be used: .* is not the teacher"):
        inputs.resolve_data(dataclasses.replace(config, occlusion_teacher=str(other)))
