"""The pieces a run is built from: the tf.distribute strategy, the backbone, the compiled
`XCosTrainer` and its optimizers and learning-rate schedules."""
import importlib

import keras
import tensorflow as tf
from absl import logging

from xcos_tf import backbones
from xcos_tf import model as xcos_model
from xcos_tf.training.config import ConfigError, init_backbone_kind


def configure_cpu_devices(count):
    """Splits the first CPU into `count` logical devices (before TensorFlow starts its runtime)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as error:
        raise ConfigError("cpu_devices", f"must be set before TensorFlow initialises its devices ({error})") from None


def make_strategy(name):
    """The tf.distribute strategy called `name` (one of config.STRATEGIES)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
        # CPUs have no NCCL: reduce on one device.
        cross_device_ops = None if gpus else tf.distribute.ReductionToOneDevice()
        return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops)
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy):
    """Whether this worker writes the run's files (always, outside multi-worker training)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()


def build_backbone(config):
    """The backbone model the config asks for (pretrained weights loaded)."""
    input_shape = (config.image_size, config.image_size, 3)
    kind, path = init_backbone_kind(config.init_backbone) if config.init_backbone else (None, "")
    if kind == "onnx":
        try:
            return backbones.from_onnx(path, feature_map=config.onnx_feature_map or None, input_shape=input_shape)
        except (OSError, ValueError) as error:
            raise ConfigError("init_backbone", f"cannot import {path!r}: {_one_line(error)}") from None
    if kind == "keras":
        return load_model_file("init_backbone", path)
    if ":" in config.backbone:
        module_name, function_name = config.backbone.split(":")
        backbone = getattr(importlib.import_module(module_name), function_name)(input_shape=input_shape)
    else:
        backbone = backbones.get(config.backbone, input_shape=input_shape)
    if kind == "weights":
        backbone.load_weights(path)
    return backbone


def build_model(config, num_replicas=1):
    """The compiled `XCosTrainer` of the config, weights created (call in `strategy.scope()`)."""
    backbone = build_backbone(config)
    backbone.trainable = not config.freeze_backbone
    tail = read_teacher_tail(config, backbone) if config.grid_init == "teacher_tail" else None
    trainer = xcos_model.build_trainer(
        backbone,
        config.num_classes,
        image_shape=(config.image_size, config.image_size, 3),
        grid_channels=tail.cell_weights.shape[-1] if tail is not None else config.grid_channels,
        grid_head=config.grid_head,
        context_init=config.context_init,
        learn_context=config.learn_context,
        attention_prior=config.attention_prior,
        margin=config.margin,
        margin_scale=config.margin_scale,
        margin_value=config.margin_value,
        attention=config.attention,
        symmetric=config.symmetric,
        ce_weight=config.ce_weight,
        xcos_weight=config.xcos_weight,
        occlusion_weight=config.occlusion_weight,
    )
    if config.init_from:
        _copy_trained_weights(config.init_from, trainer)
    elif tail is not None:
        # The tail's bias is spread over the cells; the centre set before step 1 (loop.train)
        # subtracts each cell's mean, this share included, so only the faces' variation remains.
        trainer.grid_head.set_kernel(tail.cell_weights, tail.bias)
        logging.info("Grid head initialised from the linear tail of %s after %s.", config.init_backbone, tail.feature_map)
    # Before compile: the optimizer groups are built from the trainable variables.
    trainer.grid_head.trainable = not config.freeze_grid_head
    lr_factor = num_replicas if config.lr_scaling == "linear" else 1
    optimizer = make_optimizer(config, config.optimizer, config.learning_rate * lr_factor)
    attention_optimizer = None
    if config.attention_optimizer != "same" and config.attention == "learned":
        attention_optimizer = make_optimizer(config, config.attention_optimizer, config.attention_learning_rate * lr_factor)
    backbone_optimizer = None
    if config.backbone_lr_multiplier != 1.0 and not config.freeze_backbone:
        backbone_optimizer = make_optimizer(
            config, config.optimizer, config.learning_rate * lr_factor * config.backbone_lr_multiplier
        )
    trainer.compile(optimizer=optimizer, attention_optimizer=attention_optimizer, backbone_optimizer=backbone_optimizer)
    for group_optimizer, variables in trainer.optimizer_groups():
        group_optimizer.build(variables)  # the slots must exist before a checkpoint restores them
    return trainer


def read_teacher_tail(config, backbone):
    """--grid_init=teacher_tail: the linear tail of the --init_backbone ONNX model after the same
    cut as its body, checked against the body's map and --grid_channels."""
    _, path = init_backbone_kind(config.init_backbone)
    try:
        tail = backbones.read_linear_tail(
            path, feature_map=config.onnx_feature_map or None, input_shape=(config.image_size, config.image_size, 3)
        )
    except ValueError as error:
        raise ConfigError("grid_init", f"teacher_tail cannot read the tail of {path!r}: {error}") from None
    cells, in_channels, width = tail.cell_weights.shape
    map_shape = tuple(backbone.output_shape[1:])
    if map_shape != (*tail.grid_shape, in_channels):
        raise ConfigError("grid_init", f"teacher_tail: the tail starts at a {tail.grid_shape + (in_channels,)} map, the body ends at {map_shape}")
    if config.grid_channels not in (0, width):
        raise ConfigError("grid_channels", f"must be 0 or the tail's width {width} with --grid_init=teacher_tail. Received: {config.grid_channels}")
    return tail


def _copy_trained_weights(path, trainer):
    """--init_from: the weights of a saved XCosTrainer's parts, each checked against this run's."""
    source = load_model_file("init_from", path)
    if not isinstance(source, xcos_model.XCosTrainer):
        raise ConfigError("init_from", f"{path!r} holds a {type(source).__name__}, not an XCosTrainer")
    for part in ("backbone", "grid_head", "xcos", "margin_head"):
        source_part, target_part = getattr(source, part), getattr(trainer, part)
        if source_part is None or target_part is None:
            continue  # a margin head exists only with a CE term
        # Weight order follows `trainable`, so both sides list theirs in the same mode.
        source_part.trainable = target_part.trainable
        source_weights, target_weights = source_part.weights, target_part.weights
        shapes = [tuple(w.shape) for w in source_weights]
        if shapes != [tuple(w.shape) for w in target_weights]:
            raise ConfigError("init_from", f"the {part} in {path!r} does not match this run's {part} (weight shapes differ)")
        for source_weight, target_weight in zip(source_weights, target_weights):
            target_weight.assign(source_weight)
    logging.info("Started from the weights in %s.", path)


def load_model_file(flag, path):
    """A `.keras` model of the --`flag` file, loaded in safe mode (no Python code of the file runs);
    a file Keras refuses (a Lambda layer, a class it does not know, a damaged file) raises
    `ConfigError` naming the flag."""
    try:
        return keras.saving.load_model(path, compile=False)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(flag, f"cannot load {path!r}: {_one_line(error)}") from None


def _one_line(error):
    """The gist of a loader's error: Keras wraps the cause after 'Exception encountered:' and
    adds the whole config, the Lambda refusal spans several sentences."""
    message = str(error).split("Exception encountered:", 1)[-1].strip()
    if "deserialization of a `Lambda` layer" in message:
        return "it holds a Lambda layer with Python code, which safe loading refuses (it could run any code)"
    message = (message.splitlines() or [type(error).__name__])[0]
    return message.split(". Make sure", 1)[0].rstrip(".")


def make_optimizer(config, name, learning_rate):
    """Optimizer `name` at `learning_rate` under the config's schedule, decay and precision."""
    if config.lr_schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if config.warmup_steps else learning_rate,
            decay_steps=config.train_steps - config.warmup_steps,
            warmup_target=learning_rate if config.warmup_steps else None,
            warmup_steps=config.warmup_steps,
        )
    elif config.warmup_steps:
        learning_rate = _WarmUp(learning_rate, config.warmup_steps)
    weight_decay = config.weight_decay or None
    if name == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate, momentum=config.momentum, weight_decay=weight_decay)
    elif name == "adam":
        optimizer = keras.optimizers.Adam(learning_rate, weight_decay=weight_decay)
    else:
        optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=config.weight_decay)
    if config.mixed_precision == "mixed_float16":  # bfloat16 has float32's range: no loss scale
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


# The registered name ("xcos_tf>_WarmUp") is in the compile config of saved .keras trainers: keep it.
@keras.saving.register_keras_serializable(package="xcos_tf")
class _WarmUp(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to a constant learning rate."""

    def __init__(self, learning_rate, warmup_steps):
        self.learning_rate = learning_rate
        self.warmup_steps = warmup_steps

    def __call__(self, step):
        fraction = keras.ops.minimum(keras.ops.cast(step + 1, "float32") / self.warmup_steps, 1.0)
        return self.learning_rate * fraction

    def get_config(self):
        return {"learning_rate": self.learning_rate, "warmup_steps": self.warmup_steps}
