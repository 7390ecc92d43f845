"""Tests for xcos_tf.data.records (record formats, shards) and xcos_tf.data.pairs (pair lists)."""
import json
import os
import pickle

import numpy as np
import pytest
import tensorflow as tf

from xcos_tf.data import align, pairs, records


def _face_bytes(value=90, image_format="jpeg"):
    return align.encode_image(np.full((4, 4, 3), value, np.uint8), image_format)


def test_face_record_round_trip_with_teacher():
    embedding = np.linspace(-1, 1, 8, dtype=np.float32)
    serialized = records.encode_face_example(
        _face_bytes(), "jpeg", 3, "Ada", "ada/1.jpg", align.TEMPLATE_112, embedding, -embedding
    )
    decoded = records.decode_face(serialized)
    assert set(decoded) == set(records.FACE_KEYS)
    assert decoded["label"].dtype == tf.int64 and int(decoded["label"]) == 3
    assert decoded["identity"].numpy() == b"Ada" and decoded["source"].numpy() == b"ada/1.jpg"
    np.testing.assert_allclose(decoded["landmarks"].numpy(), align.TEMPLATE_112.reshape(-1))
    np.testing.assert_allclose(decoded["teacher_embedding"].numpy(), embedding)
    np.testing.assert_allclose(decoded["teacher_embedding_flip"].numpy(), -embedding)
    image = tf.io.decode_image(decoded["image_encoded"]).numpy()
    assert image.shape == (4, 4, 3)


def test_face_record_with_missing_fields_gets_defaults():
    # A minimal record (only the image): optional fields decode to their defaults.
    example = tf.train.Example(features=tf.train.Features(feature={
        records.FACE_KEYS["image_encoded"]: tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[_face_bytes(image_format="png")])),
    }))
    decoded = records.decode_face(example.SerializeToString())
    assert int(decoded["label"]) == records.UNLABELLED
    assert decoded["identity"].numpy() == b""
    assert decoded["teacher_embedding"].shape == (0,) and decoded["landmarks"].shape == (0,)
    without_teacher = records.decode_face(
        records.encode_face_example(_face_bytes(), "jpeg", -1, "", "x.jpg", np.zeros((5, 2)))
    )
    assert without_teacher["teacher_embedding"].shape == (0,)


def test_face_record_refuses_bad_values():
    with pytest.raises(ValueError, match="label"):
        records.encode_face_example(_face_bytes(), "jpeg", -2, "", "x", np.zeros((5, 2)))
    with pytest.raises(ValueError, match="NaN"):
        records.encode_face_example(_face_bytes(), "jpeg", 0, "", "x", np.zeros((5, 2)), np.full(4, np.nan))


def test_pair_record_round_trip():
    serialized = records.encode_pair_example(
        _face_bytes(10), _face_bytes(200), "jpeg", True, 7, "A", "B", "a.jpg", "b.jpg", [1.0, 0.0], [0.6, 0.8]
    )
    decoded = records.decode_pair(serialized)
    assert set(decoded) == set(records.PAIR_KEYS)
    assert int(decoded["is_same"]) == 1 and int(decoded["fold"]) == 7
    assert decoded["name_b"].numpy() == b"B" and decoded["source_a"].numpy() == b"a.jpg"
    np.testing.assert_allclose(decoded["teacher_b"].numpy(), [0.6, 0.8])
    no_teacher = records.decode_pair(records.encode_pair_example(
        _face_bytes(), _face_bytes(), "jpeg", False, 0, "A", "B", "a", "b"))
    assert no_teacher["teacher_a"].shape == (0,) and int(no_teacher["is_same"]) == 0


def test_synthetic_shards_are_valid_and_deterministic(tmp_path):
    paths = records.write_synthetic_shards(tmp_path / "a", num_shards=2, records_per_shard=5, num_classes=3,
                                           image_shape=(32, 32, 3), seed=4, embedding_dim=16)
    again = records.write_synthetic_shards(tmp_path / "b", num_shards=2, records_per_shard=5, num_classes=3,
                                           image_shape=(32, 32, 3), seed=4, embedding_dim=16)
    for a, b in zip(paths, again):
        assert open(a, "rb").read() == open(b, "rb").read()
    manifest = records.read_manifest(tmp_path / "a")
    assert manifest["num_classes"] == 3 and sum(manifest["images_per_class"]) == 10
    assert [s["records"] for s in manifest["shards"]] == [5, 5]
    assert manifest["shards"][0]["sha256"] == records.sha256_file(paths[0])
    decoded = [records.decode_face(r) for r in tf.data.TFRecordDataset(paths)]
    assert len(decoded) == 10
    embeddings = np.stack([d["teacher_embedding"].numpy() for d in decoded])
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    assert tf.io.decode_image(decoded[0]["image_encoded"]).shape == (32, 32, 3)
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "a"))


def test_read_manifest_reports_broken_json(tmp_path):
    assert records.read_manifest(tmp_path) is None
    (tmp_path / records.MANIFEST_NAME).write_text("{broken")
    with pytest.raises(ValueError, match="manifest.json"):
        records.read_manifest(tmp_path)


def test_lfw_pairs_parser(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("2\t1\nAda\t1\t2\nAda\t1\tBob\t3\nCy\t2\t4\nBob\t1\tCy\t1\n")
    parsed = pairs.read_lfw_pairs(path)
    assert [(p.is_same, p.fold) for p in parsed] == [(True, 0), (False, 0), (True, 1), (False, 1)]
    assert parsed[1].path_b == "Bob/Bob_0003.jpg" and parsed[0].name_b == "Ada"
    assert pairs.people_in_pairs(parsed) == ["Ada", "Bob", "Cy"]
    path.write_text("1\t1\nAda\t1\tBob\t3\nAda\t1\tBob\t3\n")
    with pytest.raises(ValueError, match="line 2: expected a same-person"):
        pairs.read_lfw_pairs(path)
    path.write_text("1\t2\nAda\t1\t2\n")
    with pytest.raises(ValueError, match="promises"):
        pairs.read_lfw_pairs(path)


def test_lfw_pairs_file_from_shared(shared_dir):
    parsed = pairs.read_lfw_pairs(shared_dir / "data" / "lfw" / "pairs.txt")
    assert len(parsed) == 6000 and sum(p.is_same for p in parsed) == 3000
    assert sorted({p.fold for p in parsed}) == list(range(10))
    assert len(pairs.people_in_pairs(parsed)) == 4281  # as data/README.md says


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_insightface_bin_reader(tmp_path, protocol, as_numpy):
    images = [_face_bytes(i) for i in range(4)]
    flags = np.array([True, False]) if as_numpy else [True, False]
    path = tmp_path / "set.bin"
    with open(path, "wb") as f:
        pickle.dump((images, flags), f, protocol=protocol)
    read_images, read_flags = pairs.read_insightface_bin(path)
    assert read_images == images and read_flags.tolist() == [True, False]


def test_insightface_bin_reader_refuses_code_and_bad_content(tmp_path):
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump(([_Exploit()], [True]), f)
    with pytest.raises(ValueError, match="refusing to load posix.system|refusing to load nt.system"):
        pairs.read_insightface_bin(path)
    with open(path, "wb") as f:
        pickle.dump(([b"a", b"b", b"c"], [True]), f)
    with pytest.raises(ValueError, match="two images per pair"):
        pairs.read_insightface_bin(path)
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="not a readable"):
        pairs.read_insightface_bin(path)


def test_kfold_indices_match_sklearn_kfold():
    assert pairs.kfold_indices(23, 10).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9]
    assert np.bincount(pairs.kfold_indices(6000)).tolist() == [600] * 10


def test_manifest_json_is_sorted_and_stable(tmp_path):
    records.write_json_atomic(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": [1, 2], "b": 1}
    assert (tmp_path / "m.json").read_text().index('"a"') < (tmp_path / "m.json").read_text().index('"b"')
