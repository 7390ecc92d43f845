"""The web demo's explanation-method choice (the page itself is tested end to end in test_demo)."""
import numpy as np
import pytest
import tiny_verifiers
from test_explain import DecomposingRuntime

from xcos_tf import demo


@pytest.fixture(scope="module")
def tiny_runtime():
    return tiny_verifiers.learned_runtime(threshold=0.3)


def test_the_page_offers_the_methods_the_model_can_run(tiny_runtime):
    assert demo.method_choices(tiny_runtime) == ["xcos", "gradcam", "all"]
    assert demo.method_choices(DecomposingRuntime(tiny_runtime)) == ["xcos", "decomposition", "gradcam", "all"]
    page = demo.build_demo(tiny_runtime, aligner=None)
    radios = [block for block in page.blocks.values() if getattr(block, "elem_id", None) == "method"]
    assert len(radios) == 1 and radios[0].value == "xcos"


def test_compare_uploads_draws_the_chosen_method(tiny_runtime, tmp_path):
    import cv2

    uploads = []
    for index, face in enumerate(tiny_verifiers.smooth_faces(2, seed=7)):  # aligned crops: no detector needed
        path = tmp_path / f"face{index}.png"
        cv2.imwrite(str(path), cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
        uploads.append({"path": str(path), "orig_name": path.name})
    _, xcos_picture = demo.compare_uploads(*uploads, tiny_runtime, None, max_bytes=demo.MB)
    summary, all_picture = demo.compare_uploads(*uploads, tiny_runtime, None, max_bytes=demo.MB, method="all")
    assert xcos_picture.shape == (560, 1500, 3)
    assert all_picture.shape == (860, 1500, 3)  # two rows: this model has no decompose signature
    assert "no decomposition row: this model folder has no decompose signature" in summary
    assert not np.array_equal(xcos_picture[:560], all_picture[:560])  # the header names what is missing
