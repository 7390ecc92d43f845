"""The `decompose` signature: the original teacher's cosine split per cell, exported to the
SavedModel and ONNX (not TFLite), run by xcos_tf.runtime and explain, on a tiny 112x112 ONNX teacher."""
import json
import os

import numpy as np
import onnx
import pytest

import tiny_onnx_tails
from tiny_onnx_tails import FACE_SHAPE as IMAGE_SHAPE, tiny_face_model_112
from xcos_tf import explain, runtime
from xcos_tf.export import deployment, export_model
from xcos_tf.training import config as train_config, factory, run_folder

GRID = (4, 4)  # the tiny teacher's map


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "tiny_gdconv_112.onnx"
    onnx.save(tiny_face_model_112(), str(path))
    return str(path)


def _config(teacher_path, model_dir="unused"):
    # The shipped recipe's model: the teacher's body frozen, the positionwise head from its tail.
    return train_config.TrainConfig(
        model_dir=model_dir, train_shards=("unused",), image_size=IMAGE_SHAPE[0], init_backbone=f"onnx:{teacher_path}",
        freeze_backbone=True, freeze_grid_head=True, grid_head="positionwise", grid_init="teacher_tail", grid_channels=0,
        context_init=0.2, attention_prior=True, ce_weight=0.0, export_formats=(),
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory, teacher_path):
    trainer = factory.build_model(_config(teacher_path))
    out = tmp_path_factory.mktemp("export") / "model"
    export_model(trainer, str(out), formats=["saved_model", "onnx", "tflite"], teacher_onnx=teacher_path)
    return str(out)


def _pairs(count=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (2, count, *IMAGE_SHAPE)).astype("float32")


def _teacher_cosine(image_a, image_b):
    (embedding_a,) = tiny_onnx_tails.run_onnx(tiny_face_model_112(), image_a)
    (embedding_b,) = tiny_onnx_tails.run_onnx(tiny_face_model_112(), image_b)
    return np.sum(embedding_a * embedding_b, -1) / np.linalg.norm(embedding_a, axis=-1) / np.linalg.norm(embedding_b, axis=-1)


def test_manifest_lists_decompose_where_it_is(exported):
    with open(os.path.join(exported, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["signatures"]["decompose"]["outputs"]["contribution_map"]["shape"] == [None, *GRID]
    assert "decompose" in manifest["formats"]["saved_model"]["signatures"]
    assert manifest["formats"]["onnx"]["signatures"]["decompose"] == "xcos_decompose.onnx"
    assert "decompose" not in manifest["formats"]["tflite"]["signatures"]
    # The frozen body is the teacher's: decompose runs it, the weights are stored once.
    assert manifest["teacher"]["shares_xcos_body"] is True
    assert manifest["teacher"]["onnx"] == "tiny_gdconv_112.onnx"


def test_onnx_graphs_share_one_weights_file(exported):
    with open(os.path.join(exported, "manifest.json")) as f:
        manifest = json.load(f)
    weights = manifest["formats"]["onnx"]["external_data"]
    assert weights == ["xcos_onnx_weights.bin"] and weights[0] in manifest["files"]  # sha256-checked by runtime.load
    copies = 0
    for file in manifest["formats"]["onnx"]["signatures"].values():
        model = onnx.load(os.path.join(exported, file))  # reads the shared file by its relative name
        copies += sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    # verify, embed and decompose run the same body (and verify/embed the same head): stored once.
    assert os.path.getsize(os.path.join(exported, weights[0])) < 0.5 * copies


@pytest.mark.parametrize("model_format", ["saved_model", "onnx"])
def test_decompose_is_the_teachers_cosine_split_exactly(exported, model_format):
    image_a, image_b = _pairs()
    outputs = runtime.load(exported, format=model_format).decompose(image_a, image_b)
    assert outputs["contribution_map"].shape == (3, *GRID) and outputs["bias"].shape == (3,)
    np.testing.assert_allclose(outputs["contribution_map"].sum(axis=(1, 2)) + outputs["bias"], outputs["score"], atol=1e-5)
    np.testing.assert_allclose(outputs["score"], _teacher_cosine(image_a, image_b), atol=1e-5)


def test_decompose_checks_inputs_and_tflite_says_it_has_none(exported):
    model = runtime.load(exported, format="saved_model")
    image_a, image_b = _pairs(1)
    with pytest.raises(ValueError, match="0..255"):
        model.decompose(image_a * 2, image_b)
    with pytest.raises(ValueError, match="same batch"):
        model.decompose(image_a, np.concatenate([image_b, image_b]))
    with pytest.raises(runtime.SignatureUnavailableError, match="no decompose signature"):
        runtime.load(exported, format="tflite").decompose(image_a, image_b)


def test_explain_decomposition_on_the_export(exported):
    image_a, image_b = _pairs(1, seed=3)
    model = runtime.load(exported, format="saved_model")
    result = explain.explain_faces(image_a[0].astype(np.uint8), image_b[0].astype(np.uint8), model, methods=("decomposition",))
    decomposition = result["methods"]["decomposition"]
    assert decomposition["contribution_map"].shape == GRID
    np.testing.assert_allclose(decomposition["contribution_map"].sum() + decomposition["bias"],
                               decomposition["explained_score"], atol=1e-5)
    # TFLite has no decompose: explain's own one-line "method unavailable" error, not a traceback.
    with pytest.raises(explain.MethodUnavailableError, match="no decompose signature"):
        explain.explain_faces(image_a[0].astype(np.uint8), image_b[0].astype(np.uint8),
                              runtime.load(exported, format="tflite"), methods=("decomposition",))


def test_a_finetuned_body_gets_the_teachers_own_body(tmp_path, teacher_path):
    trainer = factory.build_model(_config(teacher_path))
    trainer.backbone.set_weights([w + 0.01 for w in trainer.backbone.get_weights()])  # no longer the teacher
    out = str(tmp_path / "model")
    manifest = export_model(trainer, out, formats=["saved_model"], teacher_onnx=teacher_path)
    assert manifest["teacher"]["shares_xcos_body"] is False
    image_a, image_b = _pairs(2, seed=5)
    outputs = runtime.load(out).decompose(image_a, image_b)
    np.testing.assert_allclose(outputs["score"], _teacher_cosine(image_a, image_b), atol=1e-5)


def test_a_run_folder_names_its_teacher(tmp_path, teacher_path):
    config = _config(teacher_path, model_dir=str(tmp_path))
    (tmp_path / run_folder.PARAMS_FILE).write_text(config.to_json())
    assert deployment.run_teacher(str(tmp_path)) == (teacher_path, None)
    assert deployment.run_teacher(str(tmp_path / "elsewhere.keras")) == (None, None)



def test_int8_keeps_the_positionwise_head_in_float(tmp_path, teacher_path):
    """The body is int8, the position-wise head's per-cell matmuls float32 (they cost 0.04 in
    score in int8 on a real-size model: xcos_tf.export.tflite.quantisable_layer_names)."""
    from xcos_tf.export import tflite
    import export_testing

    trainer = factory.build_model(_config(teacher_path))
    out = str(tmp_path / "model")
    export_model(trainer, out, formats=["tflite_int8"], calibration_images=export_testing.generated_faces(16))
    with open(os.path.join(out, "xcos_int8.tflite"), "rb") as f:
        ops = [(op, is_float, names[0]) for subgraph, op, names, is_float in tflite._model_ops(f.read()) if subgraph == "embed"]
    head_matmuls = [is_float for op, is_float, name in ops if op == "FULLY_CONNECTED" and "grid_head" in name]
    assert len(head_matmuls) == GRID[0] * GRID[1] and all(head_matmuls)
    assert any(op == "CONV_2D" and not is_float for op, is_float, _ in ops)  # the body is int8
