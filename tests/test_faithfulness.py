"""The faithfulness table: deletion and insertion curves, localisation and the pointing game of
each explanation method, against answers known in closed form on a tiny patch verifier."""
import numpy as np
import pytest
import tiny_verifiers

from xcos_tf import faithfulness, occlusion, scoring

CELLS = (7, 7)


@pytest.fixture(scope="module")
def patch_uniform():
    """Cells that see only their own patch, uniform attention: xCos score = mean of the cos map,
    and a grey patch gives an all-zero cell."""
    return tiny_verifiers.StubDecompose(tiny_verifiers.patch_runtime("uniform"))


@pytest.fixture(scope="module")
def pair():
    face_a, face_b = tiny_verifiers.smooth_faces(2, seed=3)
    return face_a, (0.5 * face_a + 0.5 * face_b).astype(np.uint8)  # some cells alike, some not


def _cumulative(values):
    return np.concatenate([[0.0], np.cumsum(values)])


def test_xcos_deletion_and_insertion_follow_theory_with_uniform_attention(patch_uniform, pair):
    face_a, face_b = pair
    clean = patch_uniform.verify(face_a[None], face_b[None])
    cos_map = clean["cos_map"][0].reshape(-1)
    scorer = faithfulness.method_scorer(patch_uniform, "xcos")
    score, contributions = scorer.explain(face_a[None], face_b[None])
    np.testing.assert_allclose(contributions, clean["cos_map"] * clean["attention_map"], atol=1e-6)
    curves = faithfulness.deletion_insertion(scorer, face_a[None], face_b[None], contributions, [np.arange(49)])
    # A greyed cell has cosine 0 and the score is the mean cosine: deleting the cells largest
    # first lowers the score by the sorted cosines / 49, restoring them raises it by the same.
    ordered = np.sort(cos_map)[::-1] / 49
    np.testing.assert_allclose(curves["deletion"]["contribution"][0], score[0] - _cumulative(ordered), atol=1e-5)
    np.testing.assert_allclose(curves["insertion"]["contribution"][0], _cumulative(ordered), atol=1e-5)
    np.testing.assert_allclose(curves["deletion"]["random"][0], score[0] - _cumulative(cos_map / 49), atol=1e-5)
    summary = faithfulness.curve_summary(curves)
    assert summary["deletion"]["contribution_auc"] < summary["deletion"]["random_auc"]
    assert summary["insertion"]["contribution_auc"] > summary["insertion"]["random_auc"]
    assert summary["deletion"]["pairs_better_than_random"] == summary["insertion"]["pairs_better_than_random"] == 1.0


def test_decomposition_curves_measure_the_teachers_cosine_of_the_kept_cells(patch_uniform, pair):
    face_a, face_b = pair
    scorer = faithfulness.method_scorer(patch_uniform, "decomposition")
    score, contributions = scorer.explain(face_a[None], face_b[None])
    stub = patch_uniform.decompose(face_a[None], face_b[None])
    np.testing.assert_allclose(contributions, stub["contribution_map"], atol=1e-6)
    np.testing.assert_allclose(score, contributions.sum(axis=(1, 2)) + stub["bias"], atol=1e-5)
    order = np.argsort(-contributions[0].reshape(-1), kind="stable")
    deletion, insertion = faithfulness.cell_curves(scorer, face_a, face_b, order, CELLS)
    # A greyed cell is a zero cell: the cosine of the grids over the kept cells only.
    grid_a = patch_uniform.embed(face_a[None])["grid"][0].reshape(49, -1)
    grid_b = patch_uniform.embed(face_b[None])["grid"][0].reshape(49, -1)

    def cosine_over(kept):
        norm_b = np.linalg.norm(grid_b[kept])
        return 0.0 if norm_b == 0 else np.sum(grid_a[kept] * grid_b[kept]) / (np.linalg.norm(grid_a) * norm_b)

    np.testing.assert_allclose(deletion, [cosine_over(order[k:]) for k in range(50)], atol=1e-5)
    np.testing.assert_allclose(insertion, [cosine_over(order[:k]) for k in range(50)], atol=1e-5)
    assert deletion[0] == pytest.approx(score[0], abs=1e-5) and insertion[-1] == pytest.approx(score[0], abs=1e-5)


def test_gradcam_curves_measure_the_embedding_cosine(patch_uniform, pair):
    face_a, face_b = pair
    gradcam = faithfulness.method_scorer(patch_uniform, "gradcam")
    decomposition = faithfulness.method_scorer(patch_uniform, "decomposition")
    embedding = scoring.embed_faces(patch_uniform, np.stack(pair))[0]
    score, contributions = gradcam.explain(face_a[None], face_b[None])
    assert score[0] == pytest.approx(scoring.row_cosine(embedding[:1], embedding[1:])[0], abs=1e-5)
    # The stub's teacher is the cosine of the same grids: one order, the same curves.
    order = np.random.default_rng(0).permutation(49)
    for by_gradcam, by_decomposition in zip(faithfulness.cell_curves(gradcam, face_a, face_b, order, CELLS),
                                            faithfulness.cell_curves(decomposition, face_a, face_b, order, CELLS)):
        np.testing.assert_allclose(by_gradcam, by_decomposition, atol=1e-5)
    assert contributions.shape == (1, 7, 7)


def test_localisation_and_pointing_by_hand():
    coverage = np.zeros((3, 7, 7))
    coverage[:, 3, :] = 1.0
    coverage[:, 2, :] = 0.25
    maps = np.ones((3, 7, 7))
    maps[0, 3, 0] = -1  # under the band
    maps[1, 2, 5] = -1  # touching it only
    maps[2, 6, 6] = -1  # elsewhere
    hits = faithfulness.localisation(maps, coverage)
    assert hits == pytest.approx({"localisation": 1 / 3, "localisation_chance": 7 / 49,
                                  "pointing": 2 / 3, "pointing_chance": 14 / 49})


def test_eye_band_lies_across_both_eyes():
    x0, y0, x1, y1 = occlusion.occluder_box("eye_band")
    eyes = occlusion.align.TEMPLATE_112[:2]
    assert (x0, x1) == (0, 112) and all(y0 <= eye[1] < y1 for eye in eyes)
    face = tiny_verifiers.smooth_faces(1)[0]
    occluded, mask = occlusion.occlude(face, "eye_band", np.random.default_rng(0))
    assert (occluded[mask] == 0).all() and mask.sum() == 112 * (y1 - y0)


def test_faithfulness_table_for_every_method(patch_uniform):
    faces = tiny_verifiers.smooth_faces(4, seed=1)
    rng = np.random.default_rng(0)
    occluded = {}
    for kind in occlusion.OCCLUDERS:
        pasted, masks = zip(*(occlusion.occlude(face, kind, rng) for face in faces))
        occluded[kind] = (np.stack(pasted), np.stack([occlusion.cell_coverage(m, CELLS) for m in masks]))
    methods = ["xcos", "decomposition", "gradcam"]
    table = faithfulness.faithfulness_table(patch_uniform, methods, faces, faces, occluded, np.array([0, 2]), rng)
    assert list(table) == methods
    assert [table[m]["explains"] for m in methods] == ["xCos score", "teacher cosine", "embedding cosine"]
    for method in methods:
        row = table[method]
        assert row["curve_pairs"] == 2 and len(row["deletion"]["contribution_curve"]) == 50
        # Face B = face A: deletion starts at the full score and ends at 0, insertion the other way.
        assert row["deletion"]["contribution_curve"][0] == pytest.approx(row["insertion"]["contribution_curve"][-1])
        assert row["deletion"]["contribution_curve"][-1] == pytest.approx(0, abs=1e-6)
        assert set(row["occluders"]) == set(occlusion.OCCLUDERS)
    # The same face against its occluded copy: only cells under the occluder lose similarity, so
    # xCos's lowest cell lies under the band in every pair (the issue's >= 90 % goal).
    band = table["xcos"]["occluders"]["eye_band"]
    assert band["localisation"] == band["pointing"] == 1.0
    assert band["localisation_chance"] == pytest.approx(14 / 49)
    lines = faithfulness.format_faithfulness(table, {"other": "not runnable"})
    text = "\n".join(lines)
    assert "deletion AUC" in text and "insertion AUC" in text and "pointing game" in text
    assert "lowest cell under eye_band" in text and "other: skipped, not runnable" in text
    with pytest.raises(ValueError, match="method"):
        faithfulness.method_scorer(patch_uniform, "lime")
