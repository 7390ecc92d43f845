r"""Trains xCos: `python -m xcos_tf.train --flagfile=xcos_tf/configs/local_mobilefacenet.flags`.

One custom loop serves every strategy (default, mirrored, multi_worker): the model and
optimizers are built in `strategy.scope()`, each step runs `strategy.run` on per-replica
batches from `strategy.distribute_datasets_from_function`. (Keras 3.15's `model.fit` fails
under MultiWorkerMirroredStrategy, so the loop does not use it.)

Everything goes into `--model_dir`: `params.json` (the config), `checkpoints/` (every
`--checkpoint_every` steps; the same command resumes after a crash or `kill -9`, which is the
promise of `keras.callbacks.BackupAndRestore`), `logs/` (TensorBoard), `best.keras` (best
evaluation accuracy), `final.keras` and the export. A finished run is not restarted: it says
so and exits 0 (`--overwrite` starts afresh).

Example:

    python -m xcos_tf.train --flagfile=xcos_tf/configs/local_mobilefacenet.flags \
        --model_dir=runs/local
"""
import dataclasses
import glob
import importlib
import json
import os
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from xcos_tf import backbones, layers, metrics
from xcos_tf import model as xcos_model
from xcos_tf.data import features, pipeline

STRATEGIES = ("default", "mirrored", "multi_worker")
OPTIMIZERS = ("sgd", "adam", "adamw")
PARAMS_FILE = "params.json"
BEST_MODEL = "best.keras"
FINAL_MODEL = "final.keras"
_NUM_SUMMARY_PAIRS = 4  # pairs whose cos and attention maps TensorBoard shows
_EVAL_BATCH = 64

# === Data ===
_TRAIN_SHARDS = flags.DEFINE_list("train_shards", [], "Glob patterns of the training TFRecord shards.")
_DATA = flags.DEFINE_enum(
    "data", "shards", ["shards", "synthetic"], "Training data: the --train_shards, or random synthetic pairs."
)
_NUM_CLASSES = flags.DEFINE_integer(
    "num_classes",
    0,
    "Identities in the training data (size of the margin head); 0: from the shards' manifest.json.",
    lower_bound=0,
)
_SAME_FRACTION = flags.DEFINE_float(
    "same_fraction", 0.5, "Share of same-identity pairs in a batch.", lower_bound=0.0, upper_bound=1.0
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 112, "Side of the square aligned face, in pixels.", lower_bound=16)
_EVAL_PAIRS = flags.DEFINE_list("eval_pairs", [], "Glob patterns of evaluation pair shards (none: no evaluation).")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 1000, "Evaluate every N steps (and at the end).", lower_bound=1)
_EVAL_MAX_PAIRS = flags.DEFINE_integer(
    "eval_max_pairs", 0, "Evaluate on at most this many pairs, every k-th one (0: all).", lower_bound=0
)
_SHUFFLE_BUFFER = flags.DEFINE_integer("shuffle_buffer", 10000, "Faces in each shuffle buffer.", lower_bound=1)
_STEPS_PER_EPOCH = flags.DEFINE_integer(
    "steps_per_epoch", 1000, "Steps in one data epoch; each epoch draws pairs with its own seed.", lower_bound=1
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and of the data order.")
_DETERMINISTIC = flags.DEFINE_bool(
    "deterministic", False, "Fixed batch order (slower input): a resumed run sees exactly the batches it would have."
)

# === Model ===
_BACKBONE = flags.DEFINE_string(
    "backbone",
    "mobilefacenet",
    f"Backbone: one of {', '.join(backbones.NAMES)}, or `package.module:function` taking "
    "input_shape= and returning a Keras model (a custom backbone). Ignored when "
    "--init_backbone is a .keras or onnx: model, which brings its own architecture.",
)
_INIT_BACKBONE = flags.DEFINE_string(
    "init_backbone",
    "",
    "Pretrained backbone to start from: PATH.keras (a backbone model), PATH.weights.h5 "
    "(weights of --backbone) or onnx:PATH (a face model imported by xcos_tf.backbones.from_onnx).",
)
_ONNX_FEATURE_MAP = flags.DEFINE_string(
    "onnx_feature_map", "", "With --init_backbone=onnx:PATH, the node whose output is the feature map (default: auto)."
)
_INIT_FROM = flags.DEFINE_string(
    "init_from",
    "",
    "A trained XCosTrainer (.keras, e.g. an earlier run's best.keras) to start from: its backbone, grid head "
    "and attention weights (margin head too when both have one); optimizers start afresh. For fine-tuning "
    "a backbone under a head trained on cached features.",
)
_FREEZE_BACKBONE = flags.DEFINE_bool("freeze_backbone", False, "Train only the grid head, attention and margin head.")
_BACKBONE_LR_MULTIPLIER = flags.DEFINE_float(
    "backbone_lr_multiplier", 1.0, "Learning rate of the backbone relative to --learning_rate.", lower_bound=0.0
)
_GRID_CHANNELS = flags.DEFINE_integer("grid_channels", 32, "Channels per grid cell.", lower_bound=1)
_MARGIN = flags.DEFINE_enum("margin", "cosface", sorted(xcos_model.MARGIN_HEADS), "Margin softmax head.")
_MARGIN_SCALE = flags.DEFINE_float("margin_scale", 30.0, "Scale s of the margin head.", lower_bound=0.0)
_MARGIN_VALUE = flags.DEFINE_float("margin_value", 0.35, "Margin m of the margin head.", lower_bound=0.0)
_ATTENTION = flags.DEFINE_enum("attention", "learned", list(layers.ATTENTION_MODES[:2]), "XCosLayer attention.")
_SYMMETRIC = flags.DEFINE_bool("symmetric", True, "Symmetric attention: score(a, b) == score(b, a).")
_CE_WEIGHT = flags.DEFINE_float("ce_weight", 1.0, "Weight of the margin-softmax loss.", lower_bound=0.0)
_XCOS_WEIGHT = flags.DEFINE_float("xcos_weight", 1.0, "Weight of MSE(score, teacher_cos).", lower_bound=0.0)
_TEACHER = flags.DEFINE_string(
    "teacher",
    "",
    "Empty: teacher_cos from the embeddings precomputed in the shards. Otherwise a frozen "
    "teacher run in the graph: a SavedModel folder or .keras model taking RGB 0..255 faces.",
)

_CACHE_BACKBONE_FEATURES = flags.DEFINE_bool(
    "cache_backbone_features",
    False,
    "With --freeze_backbone: run the frozen backbone once over the training shards (each face and its "
    "mirror image), keep its feature maps in --feature_cache_dir (xcos_tf.data.features) and train the "
    "grid head and attention on them: a step then costs the head only, not a backbone pass.",
)
_FEATURE_CACHE_DIR = flags.DEFINE_string(
    "feature_cache_dir", "", "Folder of the feature caches of --cache_backbone_features (default MODEL_DIR/feature_cache)."
)

# === Optimisation ===
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Pairs per replica per step.", lower_bound=1)
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 10000, "Total training steps.", lower_bound=1)
_OPTIMIZER = flags.DEFINE_enum("optimizer", "sgd", list(OPTIMIZERS), "Optimizer of the backbone and heads.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Learning rate of --optimizer.", lower_bound=0.0)
_MOMENTUM = flags.DEFINE_float("momentum", 0.9, "SGD momentum.", lower_bound=0.0, upper_bound=1.0)
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay of --optimizer.", lower_bound=0.0)
_ATTENTION_OPTIMIZER = flags.DEFINE_enum(
    "attention_optimizer", "adam", ["same"] + list(OPTIMIZERS), "Optimizer of the attention module."
)
_ATTENTION_LEARNING_RATE = flags.DEFINE_float(
    "attention_learning_rate", 1e-3, "Learning rate of --attention_optimizer.", lower_bound=0.0
)
_LR_SCHEDULE = flags.DEFINE_enum(
    "lr_schedule", "constant", ["constant", "cosine"], "Learning rate schedule after the warm-up."
)
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 0, "Linear warm-up steps.", lower_bound=0)
_LR_SCALING = flags.DEFINE_enum(
    "lr_scaling",
    "none",
    ["none", "linear"],
    "linear: multiply the learning rates by the number of replicas (global batch / --batch_size).",
)

# === Distribution and precision ===
_STRATEGY = flags.DEFINE_enum(
    "strategy",
    "default",
    list(STRATEGIES),
    "default: one device; mirrored: all local GPUs (else all logical CPUs); multi_worker: "
    "MultiWorkerMirroredStrategy configured by the TF_CONFIG environment variable.",
)
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "Split the CPU into this many logical devices (0: leave as is).", lower_bound=0
)
_MIXED_PRECISION = flags.DEFINE_bool(
    "mixed_precision", False, "mixed_float16 compute with loss scaling (for GPUs; float32 otherwise)."
)

# === Run ===
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Folder of params, checkpoints, logs and models.")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 500, "Save a checkpoint every N steps.", lower_bound=1)
_KEEP_CHECKPOINTS = flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints to keep.", lower_bound=1)
_LOG_EVERY = flags.DEFINE_integer("log_every", 50, "Write TensorBoard scalars every N steps.", lower_bound=1)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete an earlier run in --model_dir and start afresh.")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", "", "Export the best model here through xcos_tf.export (default: MODEL_DIR/export)."
)
_EXPORT_FORMATS = flags.DEFINE_list(
    "export_formats", ["saved_model"], "Formats for xcos_tf.export (empty: no export)."
)

# Fields that may change between a run and its resumption.
_RESUMABLE_FIELDS = (
    "train_steps", "eval_every", "eval_max_pairs", "checkpoint_every", "keep_checkpoints",
    "log_every", "overwrite", "export_dir", "export_formats", "cpu_devices",
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; `from_flags` builds it, `validate` checks it.

    The field names are the flag names; `params.json` in the model folder holds one.
    """

    model_dir: str
    num_classes: int = 0
    train_shards: tuple = ()
    data: str = "shards"
    same_fraction: float = 0.5
    image_size: int = 112
    eval_pairs: tuple = ()
    eval_every: int = 1000
    eval_max_pairs: int = 0
    shuffle_buffer: int = 10000
    steps_per_epoch: int = 1000
    seed: int = 0
    deterministic: bool = False
    backbone: str = "mobilefacenet"
    init_backbone: str = ""
    onnx_feature_map: str = ""
    init_from: str = ""
    freeze_backbone: bool = False
    backbone_lr_multiplier: float = 1.0
    grid_channels: int = 32
    margin: str = "cosface"
    margin_scale: float = 30.0
    margin_value: float = 0.35
    attention: str = "learned"
    symmetric: bool = True
    ce_weight: float = 1.0
    xcos_weight: float = 1.0
    teacher: str = ""
    cache_backbone_features: bool = False
    feature_cache_dir: str = ""
    batch_size: int = 32
    train_steps: int = 10000
    optimizer: str = "sgd"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    attention_optimizer: str = "adam"
    attention_learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    lr_scaling: str = "none"
    strategy: str = "default"
    cpu_devices: int = 0
    mixed_precision: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 50
    overwrite: bool = False
    export_dir: str = ""
    export_formats: tuple = ("saved_model",)

    @classmethod
    def from_flags(cls):
        """The config of the parsed flags (each field's flag has the field's name)."""
        values = {field.name: flags.FLAGS[field.name].value for field in dataclasses.fields(cls)}
        for name, value in values.items():
            if isinstance(value, list):
                values[name] = tuple(value)
        return cls(**values)

    @classmethod
    def from_json(cls, path):
        with open(path) as f:
            values = json.load(f)
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def validate(self):
        """Raises `ConfigError` naming the flag for a bad or inconsistent value; no graph is built."""
        if not self.model_dir:
            raise ConfigError("model_dir", "is required")
        if self.data == "shards":
            if not self.train_shards:
                raise ConfigError("train_shards", "is required with --data=shards")
            _check_globs("train_shards", self.train_shards)
        if self.eval_pairs:
            _check_globs("eval_pairs", self.eval_pairs)
        if self.num_classes < 0 or (self.data == "synthetic" and self.num_classes < 2):
            raise ConfigError("num_classes", f"must be >= 2 with --data=synthetic, >= 0 otherwise. Received: {self.num_classes}")
        if ":" in self.backbone and self.backbone.count(":") != 1:
            raise ConfigError("backbone", f"expected NAME or package.module:function. Received: {self.backbone!r}")
        if ":" not in self.backbone and self.backbone not in backbones.NAMES:
            raise ConfigError("backbone", f"unknown backbone {self.backbone!r}; valid: {', '.join(backbones.NAMES)}")
        if self.init_backbone:
            kind, path = _init_backbone_kind(self.init_backbone)
            if kind is None:
                raise ConfigError(
                    "init_backbone", f"expected PATH.keras, PATH.weights.h5 or onnx:PATH. Received: {self.init_backbone!r}"
                )
            if not os.path.isfile(path):
                raise ConfigError("init_backbone", f"no such file: {path!r}")
        if self.init_from and not (self.init_from.endswith(".keras") and os.path.isfile(self.init_from)):
            raise ConfigError("init_from", f"expected an existing XCosTrainer .keras file. Received: {self.init_from!r}")
        if self.freeze_backbone and self.backbone_lr_multiplier != 1.0:
            raise ConfigError("backbone_lr_multiplier", "has no effect with --freeze_backbone; leave it at 1")
        if self.teacher:
            if not (os.path.isfile(os.path.join(self.teacher, "saved_model.pb")) or (
                self.teacher.endswith(".keras") and os.path.isfile(self.teacher)
            )):
                raise ConfigError("teacher", f"expected a SavedModel folder or an existing .keras file. Received: {self.teacher!r}")
        if self.cache_backbone_features:
            if not self.freeze_backbone:
                raise ConfigError("cache_backbone_features", "needs --freeze_backbone: a trained backbone's maps change every step")
            if self.data != "shards" or self.teacher:
                raise ConfigError("cache_backbone_features", "needs --data=shards and teacher_cos from the shards (no --teacher)")
        if self.ce_weight + self.xcos_weight <= 0:
            raise ConfigError("xcos_weight", "and --ce_weight must not both be 0")
        if self.warmup_steps >= self.train_steps and self.warmup_steps > 0:
            raise ConfigError("warmup_steps", f"must be < --train_steps={self.train_steps}. Received: {self.warmup_steps}")
        if self.cpu_devices == 1:
            raise ConfigError("cpu_devices", "must be 0 (leave as is) or >= 2")
        for name, value in (("batch_size", self.batch_size), ("train_steps", self.train_steps)):
            if value < 1:
                raise ConfigError(name, f"must be >= 1. Received: {value}")
        known_formats = _export_formats()
        unknown_formats = set(self.export_formats) - set(known_formats)
        if known_formats and unknown_formats:
            raise ConfigError("export_formats", f"unknown {sorted(unknown_formats)}; valid: {', '.join(known_formats)}")


class ConfigError(ValueError):
    """A bad flag value: the message starts with the flag's name."""

    def __init__(self, flag, message):
        super().__init__(f"--{flag} {message}")
        self.flag = flag


def resolve_data(config):
    """Checks the shards (corrupt records, labels, teacher embeddings) and fills in
    `num_classes` from them; raises `ConfigError` naming the flag. Reads labels only."""
    if config.eval_pairs:
        num_pairs = sum(_scan("eval_pairs", config.eval_pairs, "pairs").counts)
        if min(num_pairs, config.eval_max_pairs or num_pairs) < 10:
            raise ConfigError("eval_pairs", f"hold too few pairs for 10-fold accuracy: {num_pairs} (--eval_max_pairs={config.eval_max_pairs})")
    if config.data == "shards":
        scan = _scan("train_shards", config.train_shards, "faces", num_classes=config.num_classes or None)
        if scan.teacher_dim == 0:
            raise ConfigError("train_shards", "hold no teacher embeddings: re-create them with make_shards --teacher=PATH")
        return dataclasses.replace(config, num_classes=scan.num_classes)
    return config


def _scan(flag, patterns, kind, **kwargs):
    try:
        return pipeline.scan_shards(list(patterns), kind, **kwargs)
    except (OSError, ValueError) as error:
        raise ConfigError(flag, f"cannot be used: {error}") from None


def _check_globs(flag, patterns):
    for pattern in patterns:
        if not glob.glob(pattern):
            raise ConfigError(flag, f"matches no file: {pattern!r}")


def _init_backbone_kind(spec):
    """('onnx' | 'keras' | 'weights' | None, path) of an --init_backbone value."""
    if spec.startswith("onnx:"):
        return "onnx", spec[len("onnx:"):]
    if spec.endswith(".weights.h5"):
        return "weights", spec
    if spec.endswith(".keras"):
        return "keras", spec
    return None, spec


def _export_formats():
    """The formats the export module offers, or () while it is absent."""
    try:
        export = importlib.import_module("xcos_tf.export")
    except ImportError:
        return ()
    return tuple(getattr(export, "FORMATS", ()))


# === Building blocks ===


def configure_cpu_devices(count):
    """Splits the first CPU into `count` logical devices (before TensorFlow starts its runtime)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as error:
        raise ConfigError("cpu_devices", f"must be set before TensorFlow initialises its devices ({error})") from None


def make_strategy(name):
    """The tf.distribute strategy called `name` (one of STRATEGIES)."""
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
    kind, path = _init_backbone_kind(config.init_backbone) if config.init_backbone else (None, "")
    if kind == "onnx":
        return backbones.from_onnx(path, feature_map=config.onnx_feature_map or None, input_shape=input_shape)
    if kind == "keras":
        return keras.saving.load_model(path, compile=False)
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
    trainer = xcos_model.build_trainer(
        backbone,
        config.num_classes,
        image_shape=(config.image_size, config.image_size, 3),
        grid_channels=config.grid_channels,
        margin=config.margin,
        margin_scale=config.margin_scale,
        margin_value=config.margin_value,
        attention=config.attention,
        symmetric=config.symmetric,
        ce_weight=config.ce_weight,
        xcos_weight=config.xcos_weight,
    )
    if config.init_from:
        _copy_trained_weights(config.init_from, trainer)
    lr_factor = num_replicas if config.lr_scaling == "linear" else 1
    optimizer = _make_optimizer(config, config.optimizer, config.learning_rate * lr_factor)
    attention_optimizer = None
    if config.attention_optimizer != "same" and config.attention == "learned":
        attention_optimizer = _make_optimizer(config, config.attention_optimizer, config.attention_learning_rate * lr_factor)
    backbone_optimizer = None
    if config.backbone_lr_multiplier != 1.0 and not config.freeze_backbone:
        backbone_optimizer = _make_optimizer(
            config, config.optimizer, config.learning_rate * lr_factor * config.backbone_lr_multiplier
        )
    trainer.compile(optimizer=optimizer, attention_optimizer=attention_optimizer, backbone_optimizer=backbone_optimizer)
    for group_optimizer, variables in trainer.optimizer_groups():
        group_optimizer.build(variables)  # the slots must exist before a checkpoint restores them
    return trainer


def _copy_trained_weights(path, trainer):
    """--init_from: the weights of a saved XCosTrainer's parts, each checked against this run's."""
    source = keras.saving.load_model(path, compile=False)
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


def _make_optimizer(config, name, learning_rate):
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
    if config.mixed_precision:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


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


def load_teacher(path):
    """A frozen in-graph teacher: SavedModel folder or `.keras` model, RGB 0..255 faces -> embedding."""
    if path.endswith(".keras"):
        teacher = keras.saving.load_model(path, compile=False)
    else:
        teacher = keras.layers.TFSMLayer(path, call_endpoint="serving_default")
    teacher.trainable = False
    return teacher


def teacher_cosine(teacher, image_a, image_b):
    """Cosine of the teacher's embeddings of each pair; no gradient flows into the teacher."""
    embedding = teacher(tf.concat([image_a, image_b], 0), training=False)
    if isinstance(embedding, dict):
        (embedding,) = embedding.values()
    embedding = tf.reshape(tf.cast(embedding, tf.float32), (tf.shape(embedding)[0], -1))
    embedding_a, embedding_b = tf.split(tf.math.l2_normalize(embedding, axis=-1), 2, axis=0)
    return tf.stop_gradient(tf.reduce_sum(embedding_a * embedding_b, axis=-1))


def feature_caches(config, backbone):
    """--cache_backbone_features: one feature cache per folder of training shards (one make_shards
    run each), written on the first run and reused (or continued) afterwards. Returns their folders."""
    root = config.feature_cache_dir or os.path.join(config.model_dir, "feature_cache")
    files = pipeline.list_shards(list(config.train_shards))
    folders = sorted({os.path.dirname(path) for path in files})
    caches = []
    for index, folder in enumerate(folders):
        cache = os.path.join(root, f"{index:02d}_{os.path.basename(folder)}")
        features.write_feature_shards(backbone, [f for f in files if os.path.dirname(f) == folder], cache)
        caches.append(cache)
    return caches


def train_dataset_fn(config, global_batch_size, epoch, skip_steps, caches=None):
    """`input_context -> tf.data.Dataset` of per-replica batches of the config's epoch,
    fast-forwarded by `skip_steps` global steps (the data position after a restart); with
    `caches` (feature cache folders), pairs of cached backbone maps instead of images."""
    seed = config.seed * 100003 + epoch  # each epoch draws other pairs

    def dataset_fn(input_context):
        image_shape = (config.image_size, config.image_size, 3)
        if config.data == "synthetic":
            dataset = pipeline.synthetic_pair_dataset(
                input_context.get_per_replica_batch_size(global_batch_size), image_shape=image_shape,
                num_classes=config.num_classes, seed=seed, same_fraction=config.same_fraction,
            )
        elif caches:
            dataset = features.feature_pair_dataset(
                caches, global_batch_size, same_fraction=config.same_fraction, seed=seed,
                deterministic=config.deterministic, input_context=input_context, shuffle_buffer=config.shuffle_buffer,
            )
        else:
            # The pipeline splits the global batch per replica and the files per input pipeline.
            dataset = pipeline.pair_dataset(
                list(config.train_shards), global_batch_size, same_fraction=config.same_fraction, seed=seed,
                deterministic=config.deterministic, input_context=input_context, shuffle_buffer=config.shuffle_buffer,
                num_classes=config.num_classes, image_shape=image_shape,
            )
        # Each input pipeline feeds its local replicas one batch each per step.
        replicas_per_pipeline = input_context.num_replicas_in_sync // input_context.num_input_pipelines
        return dataset.skip(skip_steps * replicas_per_pipeline)

    return dataset_fn


# === The loop ===


def make_train_step(strategy, trainer, teacher=None):
    """`iterator -> mean loss terms` of one distributed training step (a tf.function).

    With a `teacher`, teacher_cos is computed in the graph instead of read from the batch.
    """

    def replica_step(batch):
        if teacher is not None:
            batch = dict(batch, teacher_cos=teacher_cosine(teacher, batch["image_a"], batch["image_b"]))
        with tf.GradientTape(persistent=True) as tape:
            outputs = trainer(batch, training=True)
            terms = trainer.compute_loss_terms(batch, outputs)
            # Optimizers sum the replicas' gradients: divide to get the global-batch mean.
            loss = terms["loss"] / strategy.num_replicas_in_sync
        trainer.apply_loss_gradients(tape, loss)
        return {name: tf.cast(value, tf.float32) for name, value in terms.items()}

    # No tensor-dependent Python control flow here: skipping AutoGraph saves many seconds of tracing.
    @tf.function(autograph=False)
    def train_step(iterator):
        terms = strategy.run(replica_step, args=(next(iterator),))
        return {name: strategy.reduce("MEAN", value, axis=None) for name, value in terms.items()}

    return train_step


def train(config):
    """Trains (or resumes) the run the config describes; returns a dict of per-step loss lists.

    Raises `ConfigError` for bad values and for a model folder that holds another run.
    """
    config.validate()
    if config.cpu_devices:
        configure_cpu_devices(config.cpu_devices)
    # Before any TensorFlow op (reading the shards is one): MultiWorkerMirroredStrategy must
    # configure the collective ops at program startup.
    strategy = make_strategy(config.strategy)
    config = resolve_data(config)
    chief = is_chief(strategy)
    run = _RunFolder(config, chief)
    if run.finished():
        logging.info("The run in %s is finished (step %d); --overwrite starts it afresh.", config.model_dir, config.train_steps)
        if chief and config.export_dir:
            export(config)
        return {}
    keras.utils.set_random_seed(config.seed)
    if config.mixed_precision:
        if not tf.config.list_physical_devices("GPU"):
            logging.warning("--mixed_precision without a GPU: float16 on the CPU is slow, not faster.")
        keras.mixed_precision.set_global_policy("mixed_float16")
    num_replicas = strategy.num_replicas_in_sync
    global_batch_size = config.batch_size * num_replicas
    with strategy.scope():
        trainer = build_model(config, num_replicas)
        teacher = load_teacher(config.teacher) if config.teacher else None
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        best_accuracy = tf.Variable(-1.0, dtype=tf.float32, trainable=False, name="best_accuracy")
    checkpoint = tf.train.Checkpoint(
        trainer=trainer,
        optimizers=[optimizer for optimizer, _ in trainer.optimizer_groups()],
        step=step,
        best_accuracy=best_accuracy,
    )
    checkpoints = run.checkpoint_managers(checkpoint)
    restored = checkpoints.restore()
    logging.info(
        "%s at step %d: %d replica(s), global batch %d pairs.",
        "Resuming" if restored else "Starting", int(step.numpy()), num_replicas, global_batch_size,
    )

    caches = feature_caches(config, trainer.backbone) if config.cache_backbone_features else None
    train_step = make_train_step(strategy, trainer, teacher)
    evaluator = _Evaluator(config) if config.eval_pairs and chief else None
    history = {"step": [], "loss": [], "ce_loss": [], "xcos_loss": []}
    progbar = keras.utils.Progbar(config.train_steps, verbose=1 if chief else 0, stateful_metrics=["lr"])
    start_time, start_step = time.time(), int(step.numpy())
    with run.summary_writer.as_default():
        while int(step.numpy()) < config.train_steps:
            epoch, position = divmod(int(step.numpy()), config.steps_per_epoch)
            dataset = strategy.distribute_datasets_from_function(
                train_dataset_fn(config, global_batch_size, epoch, position, caches)
            )
            iterator = iter(dataset)
            for _ in range(min(config.steps_per_epoch - position, config.train_steps - int(step.numpy()))):
                terms = {name: float(value) for name, value in train_step(iterator).items()}
                step.assign_add(1)
                current = int(step.numpy())
                if not np.isfinite(terms["loss"]):
                    raise FloatingPointError(f"The loss became {terms['loss']} at step {current}; stopping.")
                for name, value in terms.items():
                    history[name].append(value)
                history["step"].append(current)
                learning_rate = _learning_rate(trainer.optimizer)
                progbar.update(current, [(name, value) for name, value in terms.items()] + [("lr", learning_rate)])
                if current % config.log_every == 0 or current == config.train_steps:
                    _write_scalars(trainer, terms, current, global_batch_size * (current - start_step) * 2 / (time.time() - start_time))
                if evaluator and (current % config.eval_every == 0 or current == config.train_steps):
                    accuracy = evaluator.evaluate(trainer, current)
                    if accuracy > float(best_accuracy.numpy()):
                        best_accuracy.assign(accuracy)
                        run.save_model(trainer, BEST_MODEL)
                        logging.info("New best xCos accuracy %.4f at step %d: saved %s.", accuracy, current, BEST_MODEL)
                # After the evaluation, so that the checkpoint holds the best accuracy so far.
                if current % config.checkpoint_every == 0 or current == config.train_steps:
                    checkpoints.save(current)
    run.save_model(trainer, FINAL_MODEL)
    run.summary_writer.flush()
    if not evaluator:
        run.save_model(trainer, BEST_MODEL)  # without evaluation the last model is the best one known
    run.close()
    if chief:
        export(config)
    _wait_for_all_workers(strategy)
    return history


def _wait_for_all_workers(strategy):
    """A last all-reduce, so that no worker exits while another still works: the chief hosts
    MultiWorkerMirroredStrategy's coordination service, whose loss aborts the others."""

    @tf.function(autograph=False)
    def all_reduce_one():
        return strategy.reduce("SUM", strategy.run(tf.constant, args=(1.0,)), axis=None)

    all_reduce_one()


def _write_scalars(trainer, terms, step, images_per_second):
    for name, value in terms.items():
        tf.summary.scalar(f"train/{name}", value, step=step)
    for optimizer, _ in trainer.optimizer_groups():
        tf.summary.scalar(f"learning_rate/{optimizer.name}", _learning_rate(optimizer), step=step)
    tf.summary.scalar("train/images_per_second", images_per_second, step=step)


def _learning_rate(optimizer):
    # A mirrored variable (or a schedule's tensor): read through a tensor, not float().
    return float(tf.convert_to_tensor(optimizer.learning_rate))


class _RunFolder:
    """The model folder of a run: params.json, checkpoints, logs, models.

    Only the chief writes into it; other workers write the same files to a local temporary
    folder that is deleted (all workers must call save, MultiWorkerMirroredStrategy's pattern).
    """

    def __init__(self, config, chief):
        self.config = config
        self.chief = chief
        self.model_dir = config.model_dir
        self.checkpoint_dir = os.path.join(self.model_dir, "checkpoints")
        params_path = os.path.join(self.model_dir, PARAMS_FILE)
        if chief and config.overwrite:
            for name in (PARAMS_FILE, BEST_MODEL, FINAL_MODEL, "checkpoints", "logs"):
                path = os.path.join(self.model_dir, name)
                if tf.io.gfile.isdir(path):
                    tf.io.gfile.rmtree(path)
                elif tf.io.gfile.exists(path):
                    tf.io.gfile.remove(path)
        if tf.io.gfile.exists(params_path) and not config.overwrite:
            _check_same_run(TrainConfig.from_json(params_path), config, params_path)
        if chief:
            self.write_dir = self.model_dir
            tf.io.gfile.makedirs(self.model_dir)
            # Written whole, then renamed: another worker never reads a half-written file.
            with tf.io.gfile.GFile(params_path + ".tmp", "w") as f:
                f.write(config.to_json())
            tf.io.gfile.rename(params_path + ".tmp", params_path, overwrite=True)
        else:
            # A local temporary folder: nothing of this worker lands in --model_dir, even after a kill -9.
            self.write_dir = tempfile.mkdtemp(prefix="xcos_train_worker_")
            logging.info("Not the chief: this worker's saves go to %s (deleted at the end).", self.write_dir)
        self.summary_writer = (
            tf.summary.create_file_writer(os.path.join(self.model_dir, "logs")) if chief else tf.summary.create_noop_writer()
        )

    def finished(self):
        latest = tf.train.latest_checkpoint(self.checkpoint_dir)
        last_step = int(latest.rsplit("-", 1)[1]) if latest else 0
        return last_step >= self.config.train_steps and tf.io.gfile.exists(os.path.join(self.model_dir, FINAL_MODEL))

    def checkpoint_managers(self, checkpoint):
        return _Checkpoints(checkpoint, self.checkpoint_dir, os.path.join(self.write_dir, "checkpoints"), self.config.keep_checkpoints)

    def save_model(self, trainer, name):
        path = os.path.join(self.write_dir, name)
        trainer.save(path)
        if not self.chief:
            tf.io.gfile.remove(path)

    def close(self):
        self.summary_writer.close()
        if not self.chief and tf.io.gfile.exists(self.write_dir):
            tf.io.gfile.rmtree(self.write_dir)


class _Checkpoints:
    """Restores from the chief's folder; saves into this worker's write folder."""

    def __init__(self, checkpoint, checkpoint_dir, write_dir, keep):
        self.checkpoint = checkpoint
        self.checkpoint_dir = checkpoint_dir
        self.write_dir = write_dir
        self.manager = tf.train.CheckpointManager(checkpoint, write_dir, max_to_keep=keep)

    def restore(self):
        latest = tf.train.latest_checkpoint(self.checkpoint_dir)
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
        return latest

    def save(self, step):
        self.manager.save(checkpoint_number=step)
        if self.write_dir != self.checkpoint_dir:
            tf.io.gfile.rmtree(self.write_dir)


def _check_same_run(saved, config, params_path):
    different = [
        field.name
        for field in dataclasses.fields(TrainConfig)
        if field.name not in _RESUMABLE_FIELDS and getattr(saved, field.name) != getattr(config, field.name)
    ]
    if different:
        changes = ", ".join(f"--{name}={getattr(saved, name)!r} -> {getattr(config, name)!r}" for name in different)
        raise ConfigError(
            different[0],
            f"differs from the run already in {os.path.dirname(params_path)} ({changes}); "
            "use another --model_dir, or --overwrite to start afresh",
        )


class _Evaluator:
    """10-fold accuracy of the xCos score and of the plain embedding cosine on the eval pairs,
    plus TensorBoard images of the cos and attention maps of the first pairs (always the same)."""

    def __init__(self, config):
        dataset = pipeline.eval_pair_dataset(
            list(config.eval_pairs), _EVAL_BATCH, image_shape=(config.image_size, config.image_size, 3)
        )
        num_pairs = sum(pipeline.scan_shards(list(config.eval_pairs), "pairs").counts)
        if config.eval_max_pairs and num_pairs > config.eval_max_pairs:
            # Every k-th pair, not the first ones: pair files list folds (and same-person pairs) in blocks.
            stride = -(-num_pairs // config.eval_max_pairs)
            dataset = dataset.unbatch().shard(stride, 0).batch(_EVAL_BATCH)
        self.dataset = dataset

    def evaluate(self, trainer, step):
        verifier = xcos_model.build_verifier(trainer)
        results = {"score": [], "cosine": [], "is_same": [], "fold": []}
        panels = None
        for batch in self.dataset:
            # One backbone pass per face: embed both, then compare the grids.
            face_a = verifier.embed({"image": batch["image_a"]}, training=False)
            face_b = verifier.embed({"image": batch["image_b"]}, training=False)
            outputs = verifier.compare({"grid_a": face_a["grid"], "grid_b": face_b["grid"]}, training=False)
            results["score"].append(np.asarray(outputs["score"]))
            results["cosine"].append(np.sum(np.asarray(face_a["embedding"]) * np.asarray(face_b["embedding"]), axis=-1))
            results["is_same"].append(batch["is_same"].numpy())
            results["fold"].append(batch["fold"].numpy())
            if panels is None:
                panels = _map_panels(batch, outputs)
        results = {key: np.concatenate(value) for key, value in results.items()}
        # The shards' own folds (LFW's 10) when they have several, else 10 consecutive folds.
        folds = results["fold"] if len(np.unique(results["fold"])) >= 2 else 10
        xcos = metrics.k_fold_accuracy(results["score"], results["is_same"], folds)
        cosine = metrics.k_fold_accuracy(results["cosine"], results["is_same"], folds)
        tf.summary.scalar("eval/xcos_accuracy", xcos.mean, step=step)
        tf.summary.scalar("eval/cosine_accuracy", cosine.mean, step=step)
        tf.summary.image("eval/pairs_cos_attention", panels, step=step, max_outputs=_NUM_SUMMARY_PAIRS)
        logging.info("Step %d: 10-fold accuracy xCos %.4f, embedding cosine %.4f.", step, xcos.mean, cosine.mean)
        return xcos.mean


def _map_panels(batch, outputs):
    """One RGB image per pair: face a | face b | cos map | attention map (maps as grey levels).

    cos in [-1, 1] maps to [0, 1]; attention is scaled by its maximum so its pattern shows.
    """
    count = min(_NUM_SUMMARY_PAIRS, int(batch["image_a"].shape[0]))
    size = batch["image_a"].shape[1:3]
    cos_map = np.asarray(outputs["cos_map"][:count])
    attention = np.asarray(outputs["attention_map"][:count])
    attention = attention / np.maximum(attention.max(axis=(1, 2), keepdims=True), 1e-12)

    def panel(cell_map):
        return tf.tile(tf.image.resize(cell_map[..., None], size, method="nearest"), (1, 1, 1, 3))

    return tf.concat(
        [batch["image_a"][:count] / 255.0, batch["image_b"][:count] / 255.0, panel((cos_map + 1.0) / 2.0), panel(attention)],
        axis=2,
    )


# === Models for the export tool ===


def load_trainer(model_dir):
    """The trainer of a run, rebuilt from its params.json, with the latest checkpoint restored."""
    params_path = os.path.join(model_dir, PARAMS_FILE)
    if not tf.io.gfile.exists(params_path):
        raise FileNotFoundError(f"No {PARAMS_FILE} in {model_dir!r}: not a training run folder.")
    config = TrainConfig.from_json(params_path)
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    if not latest:
        raise FileNotFoundError(f"No checkpoint in {os.path.join(model_dir, 'checkpoints')!r}.")
    trainer = build_model(config)
    tf.train.Checkpoint(trainer=trainer).restore(latest).expect_partial().assert_existing_objects_matched()
    return trainer


def export(config):
    """Exports the run's best model through xcos_tf.export (when that module is present)."""
    if not config.export_formats:
        return None
    try:
        from xcos_tf.export import export_model
    except ImportError:
        logging.warning("xcos_tf.export is not available: the model was not exported.")
        return None
    out_dir = config.export_dir or os.path.join(config.model_dir, "export")
    export_model(os.path.join(config.model_dir, BEST_MODEL), out_dir, formats=list(config.export_formats))
    logging.info("Exported %s to %s.", BEST_MODEL, out_dir)
    return out_dir


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = TrainConfig.from_flags()
        config.validate()
        train(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
