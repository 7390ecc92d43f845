"""The web demo's explanation-method choice (the page itself is tested end to end in test_demo)."""
import numpy as np
import pytest
import tiny_verifiers

from xcos_tf import demo


@pytest.fixture(scope="module")
def tiny_runtime():
    return tiny_verifiers.learned_runtime(threshold=0.3)


def test_the_page_offers_the_methods_the_model_can_run(tiny_runtime):
    assert demo.method_choices(tiny_runtime) == ["xcos", "gradcam", "all"]
    assert demo.method_choices(tiny_verifiers.DecomposingRuntime(tiny_runtime)) == ["xcos", "decomposition", "gradcam", "all"]
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


def test_the_served_page_passes_the_chosen_method(tiny_runtime, tmp_path, monkeypatch):
    """Through a running Gradio server (its Python client, no browser): the Radio's value reaches
    `compare_uploads` although the click handler skips Gradio's preprocessing."""
    import socket

    import cv2

    pytest.importorskip("gradio", reason='needs Gradio: pip install "xcos_tf[demo]"')
    client_lib = pytest.importorskip("gradio_client", reason="needs gradio_client (installed with Gradio)")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    paths = []
    for index, face in enumerate(tiny_verifiers.smooth_faces(2, seed=7)):
        paths.append(str(tmp_path / f"face{index}.png"))
        cv2.imwrite(paths[-1], cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
    with socket.socket() as probe:  # a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    page = demo.build_demo(tiny_runtime, aligner=None)
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False,
                show_error=False, inbrowser=False)
    try:
        client = client_lib.Client(f"http://127.0.0.1:{port}/", verbose=False, analytics_enabled=False,
                                   download_files=str(tmp_path / "downloads"))
        shapes = {}
        for method in ("xcos", "all"):
            summary, picture = client.predict(client_lib.handle_file(paths[0]), client_lib.handle_file(paths[1]),
                                              method, api_name="/on_compare")
            shapes[method] = cv2.imread(picture).shape
        assert shapes == {"xcos": (560, 1500, 3), "all": (860, 1500, 3)}
        assert "no decomposition row" in summary
    finally:
        page.close()
