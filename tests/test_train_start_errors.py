"""Training start errors (issue 16 item 8): a --model_dir that is a file, model files Keras or the
ONNX importer refuses, shards of the wrong record kind: one line naming the flag and exit 2,
nothing run; and a start that failed does not block the corrected command."""
import json
import os
import zipfile

import keras
import onnx
import pytest
from onnx import TensorProto, helper

from common_testing import TINY_BACKBONE_SPEC
from training_testing import IMAGE_SHAPE, run_python
from xcos_tf.training import config as train_config, loop, run_folder


@pytest.fixture(scope="module")
def files(tmp_path_factory, data_dir):
    """test_train's face and pair shards, a file, and model files that must be refused."""
    root = tmp_path_factory.mktemp("start_errors")
    for name in ("faces", "pairs"):
        os.symlink(data_dir / name, root / name)
    (root / "a_file").write_text("not a folder")

    inputs = keras.Input(IMAGE_SHAPE)
    keras.Model(inputs, keras.layers.Conv2D(4, 3)(keras.layers.Lambda(lambda x: x / 255.0)(inputs))).save(root / "lambda.keras")
    # A class no module registers: the saved config of a plain model with its conv renamed.
    keras.Model(inputs, keras.layers.Conv2D(4, 3, name="conv")(inputs)).save(root / "plain.keras")
    with zipfile.ZipFile(root / "plain.keras") as source, zipfile.ZipFile(root / "unknown.keras", "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                conv = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Conv2D")
                conv.update(class_name="NoSuchLayer", module="nowhere", registered_name="nowhere>NoSuchLayer")
                data = json.dumps(config).encode()
            target.writestr(item, data)

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, *IMAGE_SHAPE[:2]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, *IMAGE_SHAPE[:2]])
    graph = helper.make_graph([helper.make_node("Hardmax", ["x"], ["y"])], "unsupported", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(root / "unsupported.onnx"))
    return root


def _config(files, run_dir, **overrides):
    values = dict(model_dir=str(run_dir), train_shards=(str(files / "faces" / "*.tfrecord"),),
                  image_size=IMAGE_SHAPE[0], backbone=TINY_BACKBONE_SPEC, batch_size=4, train_steps=1,
                  checkpoint_every=1, shuffle_buffer=8, export_formats=())
    values.update(overrides)
    return train_config.TrainConfig(**values)


@pytest.mark.parametrize("overrides, message", [
    (dict(model_dir="{files}/a_file"), "--model_dir must be a folder: '.*a_file' is a file"),
    (dict(model_dir="{files}/a_file/run"), "--model_dir must be a folder: .* lies under the file '.*a_file'"),
    (dict(init_backbone="{files}/lambda.keras"), "--init_backbone cannot load .*lambda.keras': it holds a Lambda layer"),
    (dict(init_backbone="{files}/unknown.keras"), "--init_backbone cannot load .*: Could not locate class 'NoSuchLayer'$"),
    (dict(init_backbone="onnx:{files}/unsupported.onnx"), "--init_backbone cannot import .*Hardmax.*unsupported op"),
    (dict(init_from="{files}/lambda.keras"), "--init_from cannot load .*it holds a Lambda layer"),
    (dict(teacher="{files}/unknown.keras"), "--teacher cannot load .*NoSuchLayer"),
    (dict(eval_pairs=("{files}/faces/*.tfrecord",)), "--eval_pairs cannot be used: .* holds face records, not pair records"),
    (dict(train_shards=("{files}/pairs/*.tfrecord",)), "--train_shards cannot be used: .* holds pair records, not face records"),
])
def test_bad_start_names_the_flag_and_leaves_nothing_that_blocks_a_retry(files, tmp_path, overrides, message):
    def filled(value):
        return tuple(filled(v) for v in value) if isinstance(value, tuple) else value.format(files=files)

    config = _config(files, tmp_path / "run", **{name: filled(value) for name, value in overrides.items()})
    with pytest.raises(train_config.ConfigError, match=message) as caught:
        loop.train(config)
    assert "\n" not in str(caught.value)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")  # nothing trained


def test_the_corrected_command_runs_after_a_failed_start(files, tmp_path):
    failed = _config(files, tmp_path / "run", backbone="mobilefacenet", init_backbone=f"onnx:{files}/unsupported.onnx")
    with pytest.raises(train_config.ConfigError, match="--init_backbone"):
        loop.train(failed)
    corrected = _config(files, tmp_path / "run")
    assert loop.train(corrected)["step"] == [1]
    saved = train_config.TrainConfig.from_json(tmp_path / "run" / run_folder.PARAMS_FILE)
    assert saved.init_backbone == "" and saved.backbone == TINY_BACKBONE_SPEC
    # Once a run has a checkpoint, another command is still refused.
    with pytest.raises(train_config.ConfigError, match="differs from the run already in"):
        loop.train(_config(files, tmp_path / "run", batch_size=2, train_steps=2))


@pytest.mark.parametrize("args, message", [
    (["-m", "xcos_tf.train", "--model_dir={files}/a_file", "--train_shards={files}/faces/*.tfrecord"],
     "error: --model_dir must be a folder"),
    (["-m", "xcos_tf.train", "--model_dir={tmp}/run", "--train_shards={files}/faces/*.tfrecord", "--image_size=32",
      "--init_backbone={files}/lambda.keras", "--export_formats="], "error: --init_backbone cannot load"),
    (["-m", "xcos_tf.evaluate", "--model={tmp}/no_model", "--pairs={files}/faces/*.tfrecord"],
     "holds face records, not pair records"),
])
def test_command_line_exits_2_with_one_line(files, tmp_path, args, message):
    result = run_python([arg.format(files=files, tmp=tmp_path) for arg in args])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert message in result.stderr.splitlines()[-1]
