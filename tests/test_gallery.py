"""Gallery search (xcos_tf.gallery): enrolment, FAISS shortlist + xCos re-ranking, the command line.

The gallery is made of the shipped aligned sample crops (exported/samples/aligned: A and B are
one person, C and D two others), so these run without ../shared and without a face detector.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from common_testing import REPO_ROOT

from xcos_tf import api, gallery
from xcos_tf.gallery import enroll, index, search

MODEL_DIR = REPO_ROOT / "exported" / "default"
CROPS = REPO_ROOT / "exported" / "samples" / "aligned"

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "manifest.json").is_file(),
                                reason="exported/default is not in this checkout")


@pytest.fixture(scope="module")
def model():
    return api.load(str(MODEL_DIR), format="onnx")


@pytest.fixture
def people(tmp_path):
    """person_ab/A.png, person_c/C.png, person_d/D.png and an unreadable photo (a reject)."""
    folder = tmp_path / "people"
    for person, name in (("person_ab", "A"), ("person_c", "C"), ("person_d", "D")):
        (folder / person).mkdir(parents=True)
        (folder / person / f"{name}.png").write_bytes((CROPS / f"{name}.png").read_bytes())
    (folder / "person_d" / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


def test_enroll_search_and_rerun(model, people, tmp_path):
    out = tmp_path / "index"
    summary = enroll.enroll(model, str(MODEL_DIR), people, out, progress=False)
    assert (summary["added"], summary["rejected"], summary["skipped"]) == (3, 1, 0)
    assert "broken.jpg" in summary["rejects"][0]["reason"]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".index")]  # staging removed

    found = gallery.Gallery.open(out, model=model)
    hits = found.search(str(CROPS / "B.png"), top=3)
    assert [hit["identity"] for hit in hits][0] == "person_ab"
    assert len(hits) == 3 and len({hit["identity"] for hit in hits}) == 3
    assert hits[0]["photo"].endswith("A.png")
    assert [hit["score"] for hit in hits] == sorted((hit["score"] for hit in hits), reverse=True)
    direct = model.verify(str(CROPS / "B.png"), str(CROPS / "A.png"))  # float32 grids: the stored ones are float16
    assert hits[0]["score"] == pytest.approx(direct["score"], abs=1e-4)
    np.testing.assert_allclose(hits[0]["cos_map"], direct["cos_map"], atol=1e-3)
    np.testing.assert_allclose(hits[0]["attention_map"], direct["attention_map"], atol=1e-4)

    # A second photo of person_ab: only it is embedded, the reject is not retried.
    (people / "person_ab" / "B.png").write_bytes((CROPS / "B.png").read_bytes())
    again = enroll.enroll(model, str(MODEL_DIR), people, out, progress=False)
    assert (again["added"], again["rejected"], again["skipped"], again["entries"]) == (1, 0, 4, 4)
    assert gallery.Gallery.open(out, model=model).search(str(CROPS / "B.png"), top=1)[0]["score"] > 0.99


def test_faiss_shortlist_agrees_with_exact_search(model, people, tmp_path):
    enroll.enroll(model, str(MODEL_DIR), people, tmp_path / "index", progress=False)
    data = index.open_index(tmp_path / "index")
    probe = model.embed(str(CROPS / "B.png"))["grid"]
    exact = search.Gallery(data, model).search_grid(probe, top=3)
    for index_type in search.INDEX_TYPES:
        shortlisted = search.Gallery(data, model, exact_limit=0, shortlist=3, index_type=index_type)
        assert shortlisted._faiss_index is not None
        hits = shortlisted.search_grid(probe, top=3)
        assert [hit["photo"] for hit in hits] == [hit["photo"] for hit in exact]
    narrow = search.Gallery(data, model, exact_limit=0, shortlist=1)
    assert len(narrow.search_grid(probe, top=3)) == 1


def test_grids_are_stored_as_float16_and_read_memory_mapped(model, people, tmp_path):
    enroll.enroll(model, str(MODEL_DIR), people, tmp_path / "index", progress=False)
    data = index.open_index(tmp_path / "index")
    assert isinstance(data.grids, np.memmap) and data.grids.dtype == np.float16
    assert isinstance(data.summaries, np.memmap) and data.summaries.shape == (3, model.runtime.grid_shape[-1])
    assert json.loads((tmp_path / "index" / index.MANIFEST).read_text())["version"] == index.VERSION == 2
    grids = np.stack([model.embed(entry["photo"])["grid"] for entry in data.entries])
    # float16 rounding (relative 2**-11) plus onnxruntime's batch-size jitter (enrolment embeds in batches)
    np.testing.assert_allclose(data.grids.astype(np.float32), grids, rtol=2**-11, atol=1e-6)
    np.testing.assert_allclose(data.summaries, index.summarize(data.grids), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(data.summaries, axis=1), 1.0, atol=1e-5)
    with pytest.raises(index.GalleryError, match="beyond float16"):
        index.stored_grids(np.full((1, *model.runtime.grid_shape), 1e5, np.float32), model.runtime.grid_shape)


def _synthetic_gallery(shape, count, seed=0):
    """`count` random grids of `shape` in clusters of four (a person's photos: one centre plus noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (count // 4, *shape)).astype(np.float32)
    grids = np.repeat(centres, 4, axis=0) + rng.normal(0, 0.6, (count // 4 * 4, *shape)).astype(np.float32)
    entries = [{"identity": f"person_{row // 4:03d}", "photo": f"/photos/{row:04d}.jpg"} for row in range(len(grids))]
    return entries, grids, centres


def test_shortlist_and_rerank_agree_with_brute_force(model, tmp_path, monkeypatch):
    shape = model.runtime.grid_shape
    entries, grids, centres = _synthetic_gallery(shape, 240)
    monkeypatch.setattr(index, "CHUNK_ROWS", 50)  # the streamed save, in several chunks and two parts
    empty = index.IndexData.empty(str(MODEL_DIR), "fingerprint", shape)
    index.save(empty, tmp_path / "index", entries=entries[:100], grids=grids[:100])
    index.save(index.open_index(tmp_path / "index"), tmp_path / "index", entries=entries[100:], grids=grids[100:])
    data = index.open_index(tmp_path / "index")
    assert [entry["photo"] for entry in data.entries] == [entry["photo"] for entry in entries]
    np.testing.assert_array_equal(data.grids, grids.astype(np.float16))

    brute_force = search.Gallery(data, model)  # 240 <= exact_limit: every grid compared
    assert brute_force._faiss_index is None
    probes = centres[::6] + np.random.default_rng(1).normal(0, 0.6, centres[::6].shape).astype(np.float32)
    for index_type in search.INDEX_TYPES:
        shortlisted = search.Gallery(data, model, exact_limit=0, shortlist=24, index_type=index_type)
        for person, probe in zip(range(0, len(centres), 6), probes):
            exact = brute_force.search_grid(probe, top=3)
            hits = shortlisted.search_grid(probe, top=3)
            assert exact[0]["identity"] == hits[0]["identity"] == f"person_{person:03d}"
            assert hits[0]["photo"] == exact[0]["photo"] and hits[0]["score"] == pytest.approx(exact[0]["score"], abs=1e-6)
    # A shortlist of the whole gallery is brute force.
    whole = search.Gallery(data, model, exact_limit=0, shortlist=len(entries))
    probe = probes[0]
    assert search.hits_json(whole.search_grid(probe, top=5)) == search.hits_json(brute_force.search_grid(probe, top=5))


def _write_version_1(index_dir, data):
    """`data` in the version-1 layout: float32 grids.npy, float32 embeddings.npy, no summaries."""
    grids = np.asarray(data.grids, np.float32)
    for name in os.listdir(index_dir):
        if name.endswith(".npy"):
            os.remove(index_dir / name)
    np.save(index_dir / "grids.npy", grids)
    flat = grids.reshape(len(grids), -1)
    np.save(index_dir / "embeddings.npy", flat / np.linalg.norm(flat, axis=1, keepdims=True))
    manifest = json.loads((index_dir / index.MANIFEST).read_text())
    manifest = {key: value for key, value in manifest.items() if key not in ("grid_dtype", "summaries")}
    (index_dir / index.MANIFEST).write_text(json.dumps(dict(manifest, version=1)))


def test_version_1_index_is_read_and_rewritten_as_version_2(model, people, tmp_path):
    out = tmp_path / "index"
    enroll.enroll(model, str(MODEL_DIR), people, out, progress=False)
    probe = model.embed(str(CROPS / "B.png"))["grid"]
    current = search.hits_json(gallery.Gallery.open(out, model=model).search_grid(probe, top=3))
    _write_version_1(out, index.open_index(out))

    old = index.open_index(out)
    assert old.grids.dtype == np.float32 and old.summaries.shape == (3, model.runtime.grid_shape[-1])
    assert search.hits_json(gallery.Gallery.open(out, model=model).search_grid(probe, top=3)) == current
    shortlisted = search.Gallery(old, model, exact_limit=0, shortlist=2)
    assert shortlisted.search_grid(probe, top=1)[0]["identity"] == "person_ab"

    (people / "person_ab" / "B.png").write_bytes((CROPS / "B.png").read_bytes())
    summary = enroll.enroll(model, str(MODEL_DIR), people, out, progress=False)
    assert (summary["added"], summary["entries"]) == (1, 4)
    assert json.loads((out / index.MANIFEST).read_text())["version"] == 2
    assert not (out / "embeddings.npy").exists()
    upgraded = index.open_index(out)
    assert upgraded.grids.dtype == np.float16 and len(upgraded.summaries) == 4
    assert search.hits_json(gallery.Gallery.open(out, model=model).search_grid(probe, top=3))[1:] == current[1:]


def test_unknown_index_version_is_one_clear_line(model, people, tmp_path):
    out = tmp_path / "index"
    enroll.enroll(model, str(MODEL_DIR), people, out, progress=False)
    manifest = json.loads((out / index.MANIFEST).read_text())
    (out / index.MANIFEST).write_text(json.dumps(dict(manifest, version=3)))
    with pytest.raises(index.GalleryError, match="version 3, this xcos_tf reads versions 1, 2: .*--out NEW_INDEX"):
        index.open_index(out)
    result = _gallery_cli("search", str(CROPS / "A.png"), "--gallery", str(out))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "gallery index version 3" in result.stderr and "enroll --model DIR" in result.stderr


def test_another_models_gallery_is_refused(model, people, tmp_path):
    enroll.enroll(model, str(MODEL_DIR), people, tmp_path / "index", progress=False)
    manifest_path = tmp_path / "index" / index.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(dict(manifest, model_fingerprint="0" * 64)))
    with pytest.raises(index.GalleryError, match="enrolled with another model"):
        gallery.Gallery.open(tmp_path / "index", model=model)
    with pytest.raises(index.GalleryError, match="not a gallery index"):
        index.open_index(tmp_path)
    with pytest.raises(index.GalleryError, match="exists and is not a gallery index"):
        enroll.enroll(model, str(MODEL_DIR), people, people, progress=False)  # never replaces the photos
    assert (people / "person_c" / "C.png").is_file()


def _gallery_cli(*args):
    return subprocess.run([sys.executable, "-m", "xcos_tf.gallery", *args, "--format", "onnx"],
                          capture_output=True, text=True, cwd=REPO_ROOT)


def test_command_line_enroll_and_search(people, tmp_path):
    out = tmp_path / "index"
    enrolled = _gallery_cli("enroll", "--model", str(MODEL_DIR), "--images", str(people), "--out", str(out),
                            "--noprogress")
    assert enrolled.returncode == 0, enrolled.stderr
    assert "enrolled 3 new faces" in enrolled.stdout and "broken.jpg" in enrolled.stderr
    probe = str(CROPS / "B.png")
    picture = tmp_path / "hits.png"
    searched = _gallery_cli("search", probe, "--gallery", str(out), "--top", "2", "--json", "--out", str(picture))
    assert searched.returncode == 0, searched.stderr
    hits = json.loads(searched.stdout)[probe]
    assert [hit["identity"] for hit in hits][0] == "person_ab" and len(hits) == 2
    assert set(hits[0]) == {"identity", "photo", "score", "cos_map", "attention_map"}
    assert np.asarray(hits[0]["cos_map"]).shape == (7, 7) and np.asarray(hits[1]["attention_map"]).shape == (7, 7)
    assert picture.stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [
    (("search", "nowhere.jpg", "--gallery", "x"), "nowhere.jpg: no such photo or folder"),
    (("search", str(CROPS / "A.png"), "--gallery", str(CROPS)), "not a gallery index"),
    (("enroll", "--model", str(MODEL_DIR), "--images", "nowhere", "--out", "x"), "--images: nowhere: not a folder"),
    (("rank",), "expected a command"),
])
def test_command_line_errors_are_one_line(args, message):
    result = _gallery_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_demo_search_tab(model, people, tmp_path):
    from xcos_tf import demo
    from xcos_tf.gallery import demo_tab

    enroll.enroll(model, str(MODEL_DIR), people, tmp_path / "index", progress=False)
    found = gallery.Gallery.open(tmp_path / "index", model=model)
    read = lambda path, name: demo.read_upload(path, name, 2**20)  # noqa: E731 (the demo's own reader)
    markdown, drawn = demo_tab.search_upload({"path": str(CROPS / "B.png"), "orig_name": "B.png"}, found, read)
    assert "1. **person_ab**" in markdown and "3 enrolled faces" in markdown
    assert drawn.ndim == 3 and drawn.shape[0] == 3 * 260  # one 2.6-inch row per hit
    with pytest.raises(ValueError, match="no photo"):
        demo_tab.search_upload(None, found, read)
    with pytest.raises(demo.UploadError, match="file type .txt"):
        demo_tab.search_upload({"path": str(tmp_path / "x.txt"), "orig_name": "x.txt"}, found, read)
    pytest.importorskip("gradio", reason='needs Gradio: pip install "xcos_tf[demo]"')
    page = demo.build_demo(model.runtime, None, gallery=found)
    assert any(getattr(block, "label", None) == "Search the gallery" for block in page.blocks.values())
