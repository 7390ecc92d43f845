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
    direct = model.verify(str(CROPS / "B.png"), str(CROPS / "A.png"))
    assert hits[0]["score"] == pytest.approx(direct["score"], abs=1e-5)
    np.testing.assert_allclose(hits[0]["cos_map"], direct["cos_map"], atol=1e-5)
    np.testing.assert_allclose(hits[0]["attention_map"], direct["attention_map"], atol=1e-5)

    # A second photo of person_ab: only it is embedded, the reject is not retried.
    (people / "person_ab" / "B.png").write_bytes((CROPS / "B.png").read_bytes())
    again = enroll.enroll(model, str(MODEL_DIR), people, out, progress=False)
    assert (again["added"], again["rejected"], again["skipped"], again["entries"]) == (1, 0, 4, 4)
    assert gallery.Gallery.open(out, model=model).search(str(CROPS / "B.png"), top=1)[0]["score"] > 0.99


def test_faiss_shortlist_agrees_with_exact_search(model, people, tmp_path):
    enroll.enroll(model, str(MODEL_DIR), people, tmp_path / "index", progress=False)
    data = index.open_index(tmp_path / "index")
    probe = model.embed(str(CROPS / "B.png"))
    exact = search.Gallery(data, model).search_grid(probe["grid"], probe["embedding"], top=3)
    for index_type in search.INDEX_TYPES:
        shortlisted = search.Gallery(data, model, exact_limit=0, shortlist=3, index_type=index_type)
        assert shortlisted._faiss_index is not None
        hits = shortlisted.search_grid(probe["grid"], probe["embedding"], top=3)
        assert [hit["photo"] for hit in hits] == [hit["photo"] for hit in exact]
    narrow = search.Gallery(data, model, exact_limit=0, shortlist=1)
    assert len(narrow.search_grid(probe["grid"], probe["embedding"], top=3)) == 1


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
