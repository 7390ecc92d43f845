"""The frozen `TrainConfig` of a training run, its checks, and its absl flags.

The flags are generated from the dataclass fields (`define_flags`): a field and its flag share
name, default, help and bounds, so they cannot drift apart. Nothing is defined at import time.
"""
import dataclasses
import glob
import json
import math
import os

from absl import flags

from xcos_tf import backbones, layers
from xcos_tf import model as xcos_model
from xcos_tf.runtime import FORMATS as EXPORT_FORMATS

STRATEGIES = ("default", "mirrored", "multi_worker")
OPTIMIZERS = ("sgd", "adam", "adamw")
PRECISIONS = ("none", "mixed_float16", "mixed_bfloat16")
# The scale s and margin m of each margin head when --margin_scale / --margin_value are not given
# (CosFace: Wang et al. 2018; ArcFace: Deng et al. 2019, as in insightface's arcface_torch).
MARGIN_DEFAULTS = {"cosface": {"scale": 30.0, "value": 0.35}, "arcface": {"scale": 64.0, "value": 0.5}}

# Fields that may change between a run and its resumption.
RESUMABLE_FIELDS = (
    "train_steps", "eval_every", "eval_max_pairs", "checkpoint_every", "keep_checkpoints",
    "log_every", "overwrite", "export_dir", "export_formats", "cpu_devices", "centre_faces",
)
GRID_HEADS = ("conv", "positionwise")
GRID_INITS = ("random", "teacher_tail")


def _field(default, help, choices=None, lower_bound=None, upper_bound=None):
    """A dataclass field that carries what its flag needs (help, enum choices, bounds)."""
    metadata = {"help": help, "choices": choices, "lower_bound": lower_bound, "upper_bound": upper_bound}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; `from_flags` builds it, `validate` checks it.

    The field names are the flag names; `params.json` in the model folder holds one.
    `margin_scale` / `margin_value` left at None take the margin head's defaults
    (`MARGIN_DEFAULTS`), so params.json records the values the run used.
    """

    # === Run (model_dir first: it is the one field without a default) ===
    model_dir: str = _field(None, "Folder of params, checkpoints, logs and models.")
    # === Data ===
    num_classes: int = _field(
        0, "Identities in the training data (size of the margin head); 0: from the shards' manifest.json.", lower_bound=0
    )
    train_shards: tuple = _field((), "Glob patterns of the training TFRecord shards.")
    data: str = _field("shards", "Training data: the --train_shards, or random synthetic pairs.", choices=("shards", "synthetic"))
    same_fraction: float = _field(0.5, "Share of same-identity pairs in a batch.", lower_bound=0.0, upper_bound=1.0)
    image_size: int = _field(112, "Side of the square aligned face, in pixels.", lower_bound=16)
    eval_pairs: tuple = _field((), "Glob patterns of evaluation pair shards (none: no evaluation).")
    eval_every: int = _field(1000, "Evaluate every N steps (and at the end).", lower_bound=1)
    eval_max_pairs: int = _field(0, "Evaluate on at most this many pairs, every k-th one (0: all).", lower_bound=0)
    shuffle_buffer: int = _field(10000, "Faces in each shuffle buffer.", lower_bound=1)
    steps_per_epoch: int = _field(
        1000, "Steps in one data epoch; each epoch draws pairs with its own seed.", lower_bound=1
    )
    seed: int = _field(0, "Seed of the weights and of the data order.")
    deterministic: bool = _field(
        False, "Fixed batch order (slower input): a resumed run sees exactly the batches it would have."
    )
    # === Model ===
    backbone: str = _field(
        "mobilefacenet",
        f"Backbone: one of {', '.join(backbones.NAMES)}, or `package.module:function` taking "
        "input_shape= and returning a Keras model (a custom backbone). Ignored when "
        "--init_backbone is a .keras or onnx: model, which brings its own architecture.",
    )
    init_backbone: str = _field(
        "",
        "Pretrained backbone to start from: PATH.keras (a backbone model), PATH.weights.h5 "
        "(weights of --backbone) or onnx:PATH (a face model imported by xcos_tf.backbones.from_onnx).",
    )
    onnx_feature_map: str = _field(
        "", "With --init_backbone=onnx:PATH, the node whose output is the feature map (default: auto)."
    )
    init_from: str = _field(
        "",
        "A trained XCosTrainer (.keras, e.g. an earlier run's best.keras) to start from: its backbone, grid head "
        "and attention weights (margin head too when both have one); optimizers start afresh. For fine-tuning "
        "a backbone under a head trained on cached features.",
    )
    freeze_backbone: bool = _field(False, "Train only the grid head, attention and margin head.")
    backbone_lr_multiplier: float = _field(
        1.0, "Learning rate of the backbone relative to --learning_rate.", lower_bound=0.0
    )
    grid_head: str = _field(
        "conv",
        "Grid head: conv (a shared 1x1 conv + BN + PReLU, the paper's) or positionwise (one linear map per "
        "cell, centred per cell by its mean over training faces; xcos_tf.layers.PositionwiseGridHead).",
        choices=GRID_HEADS,
    )
    grid_init: str = _field(
        "random",
        "Start of the positionwise head: random, or teacher_tail (the linear tail after the cut of "
        "--init_backbone=onnx:PATH, so the cells are that model's partial embeddings).",
        choices=GRID_INITS,
    )
    grid_channels: int = _field(
        32, "Channels per grid cell; 0 with --grid_init=teacher_tail: the tail's embedding size.", lower_bound=0
    )
    centre_faces: int = _field(
        20000, "Fresh positionwise run: centre each cell on at most this many training faces (and mirrors).", lower_bound=1
    )
    context_init: float = _field(0.0, "Positionwise head: initial weight of the whole-face context term of each cell.")
    learn_context: bool = _field(False, "Positionwise head: train the context weights.")
    freeze_grid_head: bool = _field(
        False,
        "Keep the grid head as initialised (with --grid_init=teacher_tail: the teacher's own tail, so every "
        "cell is exactly the teacher's partial embedding); train only the attention (and margin head).",
    )
    margin: str = _field("cosface", "Margin softmax head.", choices=tuple(sorted(xcos_model.MARGIN_HEADS)))
    margin_scale: float = _field(
        None, "Scale s of the margin head (default: cosface 30, arcface 64).", lower_bound=0.0
    )
    margin_value: float = _field(
        None, "Margin m of the margin head (default: cosface 0.35, arcface 0.5).", lower_bound=0.0
    )
    attention: str = _field("learned", "XCosLayer attention.", choices=tuple(layers.ATTENTION_MODES[:2]))
    symmetric: bool = _field(True, "Symmetric attention: score(a, b) == score(b, a).")
    attention_prior: bool = _field(
        False, "Learned attention logits added to log(|a_i| |b_i|), the cells' norm product (XCosLayer attention_prior)."
    )
    ce_weight: float = _field(1.0, "Weight of the margin-softmax loss.", lower_bound=0.0)
    xcos_weight: float = _field(1.0, "Weight of MSE(score, teacher_cos).", lower_bound=0.0)
    teacher: str = _field(
        "",
        "Empty: teacher_cos from the embeddings precomputed in the shards. Otherwise a frozen "
        "teacher run in the graph: a SavedModel folder or .keras model taking RGB 0..255 faces.",
    )
    cache_backbone_features: bool = _field(
        False,
        "With --freeze_backbone: run the frozen backbone once over the training shards (each face and its "
        "mirror image), keep its feature maps in --feature_cache_dir (xcos_tf.data.features) and train the "
        "grid head and attention on them: a step then costs the head only, not a backbone pass.",
    )
    feature_cache_dir: str = _field(
        "", "Folder of the feature caches of --cache_backbone_features (default MODEL_DIR/feature_cache)."
    )
    occlusion_fraction: float = _field(
        0.0,
        "Share of the training pairs whose face B wears a random synthetic occluder (a dark band over the eyes, "
        "a grey rectangle, a mask-like lower-face block: xcos_tf.occlusion.training_occlusion), the target being "
        "the teacher's cosine of the occluded pair. Needs --cache_backbone_features: the occluded faces, their "
        "maps and their teacher embeddings get their own feature caches (xcos_tf.data.occluded_features).",
        lower_bound=0.0, upper_bound=1.0,
    )
    occlusion_teacher: str = _field(
        "", "The teacher run on the occluded faces (the very model that embedded the shards; default: the "
        "--init_backbone=onnx:PATH file)."
    )
    occlusion_weight: float = _field(
        0.0, "Weight of the per-cell occlusion loss: on same-person pairs whose face B is occluded, "
        "relu(margin + lowest cos under the occluder - lowest cos elsewhere) (xcos_tf.model.occlusion_ranking_loss).",
        lower_bound=0.0,
    )
    # === Optimisation ===
    batch_size: int = _field(32, "Pairs per replica per step.", lower_bound=1)
    train_steps: int = _field(10000, "Total training steps.", lower_bound=1)
    optimizer: str = _field("sgd", "Optimizer of the backbone and heads.", choices=OPTIMIZERS)
    learning_rate: float = _field(1e-3, "Learning rate of --optimizer.", lower_bound=0.0)
    momentum: float = _field(0.9, "SGD momentum.", lower_bound=0.0, upper_bound=1.0)
    weight_decay: float = _field(0.0, "Decoupled weight decay of --optimizer.", lower_bound=0.0)
    attention_optimizer: str = _field("adam", "Optimizer of the attention module.", choices=("same",) + OPTIMIZERS)
    attention_learning_rate: float = _field(1e-3, "Learning rate of --attention_optimizer.", lower_bound=0.0)
    lr_schedule: str = _field("constant", "Learning rate schedule after the warm-up.", choices=("constant", "cosine"))
    warmup_steps: int = _field(0, "Linear warm-up steps.", lower_bound=0)
    lr_scaling: str = _field(
        "none",
        "linear: multiply the learning rates by the number of replicas (global batch / --batch_size).",
        choices=("none", "linear"),
    )
    # === Distribution and precision ===
    strategy: str = _field(
        "default",
        "default: one device; mirrored: all local GPUs (else all logical CPUs); multi_worker: "
        "MultiWorkerMirroredStrategy configured by the TF_CONFIG environment variable.",
        choices=STRATEGIES,
    )
    cpu_devices: int = _field(0, "Split the CPU into this many logical devices (0: leave as is).", lower_bound=0)
    mixed_precision: str = _field(
        "none",
        "Precision policy: mixed_float16 (with loss scaling, for GPUs) or mixed_bfloat16 (for CPUs with "
        "AVX512_BF16); losses and the xCos cosines stay float32.",
        choices=PRECISIONS,
    )
    jit_compile: bool = _field(False, "Compile each replica's training step with XLA.")
    # === Run ===
    checkpoint_every: int = _field(500, "Save a checkpoint every N steps.", lower_bound=1)
    keep_checkpoints: int = _field(3, "Checkpoints to keep.", lower_bound=1)
    log_every: int = _field(50, "Write TensorBoard scalars every N steps.", lower_bound=1)
    overwrite: bool = _field(False, "Delete an earlier run in --model_dir and start afresh.")
    export_dir: str = _field("", "Export the best model here through xcos_tf.export (default: MODEL_DIR/export).")
    export_formats: tuple = _field(("saved_model",), "Formats for xcos_tf.export (empty: no export).")

    def __post_init__(self):
        defaults = MARGIN_DEFAULTS.get(self.margin)
        if defaults is not None:
            # The frozen dataclass's own way to fill a field in its constructor.
            if self.margin_scale is None:
                object.__setattr__(self, "margin_scale", defaults["scale"])
            if self.margin_value is None:
                object.__setattr__(self, "margin_value", defaults["value"])

    @classmethod
    def from_flags(cls, flag_values=flags.FLAGS):
        """The config of the parsed flags (each field's flag has the field's name)."""
        values = {field.name: flag_values[field.name].value for field in dataclasses.fields(cls)}
        for name, value in values.items():
            if isinstance(value, list):
                values[name] = tuple(value)
        return cls(**values)

    @classmethod
    def from_json(cls, path):
        with open(path) as f:
            values = json.load(f)
        known = {field.name for field in dataclasses.fields(cls)}
        if isinstance(values.get("mixed_precision"), bool):  # params.json of runs before the enum
            values["mixed_precision"] = "mixed_float16" if values["mixed_precision"] else "none"
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def validate(self):
        """Raises `ConfigError` naming the flag for a bad or inconsistent value; no graph is built."""
        if not self.model_dir:
            raise ConfigError("model_dir", "is required")
        for name in ("model_dir", "feature_cache_dir", "export_dir"):
            _check_folder_path(name, getattr(self, name))
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
            kind, path = init_backbone_kind(self.init_backbone)
            if kind is None:
                raise ConfigError(
                    "init_backbone", f"expected PATH.keras, PATH.weights.h5 or onnx:PATH. Received: {self.init_backbone!r}"
                )
            if not os.path.isfile(path):
                raise ConfigError("init_backbone", f"no such file: {path!r}")
        if self.init_from and not (self.init_from.endswith(".keras") and os.path.isfile(self.init_from)):
            raise ConfigError("init_from", f"expected an existing XCosTrainer .keras file. Received: {self.init_from!r}")
        self._validate_grid_head()
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
        if self.occlusion_fraction and not self.cache_backbone_features:
            raise ConfigError("occlusion_fraction", "needs --cache_backbone_features (the occluded faces are cached)")
        if self.occlusion_weight and not self.occlusion_fraction:
            raise ConfigError("occlusion_weight", "needs --occlusion_fraction > 0 (pairs with an occluder)")
        if self.occlusion_fraction and not self.occlusion_teacher and not self.init_backbone.startswith("onnx:"):
            raise ConfigError("occlusion_teacher", "is required unless --init_backbone=onnx:PATH names the teacher")
        if self.ce_weight + self.xcos_weight <= 0:
            raise ConfigError("xcos_weight", "and --ce_weight must not both be 0")
        if self.warmup_steps >= self.train_steps and self.warmup_steps > 0:
            raise ConfigError("warmup_steps", f"must be < --train_steps={self.train_steps}. Received: {self.warmup_steps}")
        if self.cpu_devices == 1:
            raise ConfigError("cpu_devices", "must be 0 (leave as is) or >= 2")
        for name, value in (("batch_size", self.batch_size), ("train_steps", self.train_steps)):
            if value < 1:
                raise ConfigError(name, f"must be >= 1. Received: {value}")
        unknown_formats = set(self.export_formats) - set(EXPORT_FORMATS)
        if unknown_formats:
            raise ConfigError("export_formats", f"unknown {sorted(unknown_formats)}; valid: {', '.join(EXPORT_FORMATS)}")

    def _validate_grid_head(self):
        if self.grid_init == "teacher_tail":
            if self.grid_head != "positionwise":
                raise ConfigError("grid_init", f"teacher_tail needs --grid_head=positionwise. Received: --grid_head={self.grid_head}")
            if not self.init_backbone.startswith("onnx:"):
                raise ConfigError("grid_init", "teacher_tail reads the tail of an ONNX model: it needs --init_backbone=onnx:PATH")
        elif self.grid_channels == 0:
            raise ConfigError("grid_channels", "0 (the tail's width) needs --grid_init=teacher_tail")
        if not math.isfinite(self.context_init):
            raise ConfigError("context_init", f"must be finite. Received: {self.context_init}")
        if self.grid_head != "positionwise" and (self.context_init != 0.0 or self.learn_context):
            raise ConfigError("context_init", "and --learn_context need --grid_head=positionwise")
        if self.attention_prior and self.attention != "learned":
            raise ConfigError("attention_prior", f"needs --attention=learned. Received: --attention={self.attention}")
        if self.freeze_grid_head and self.grid_init == "random" and not self.init_from:
            raise ConfigError("freeze_grid_head", "would keep a randomly initialised head: use it with --grid_init=teacher_tail or --init_from")


class ConfigError(ValueError):
    """A bad flag value: the message starts with the flag's name."""

    def __init__(self, flag, message):
        super().__init__(f"--{flag} {message}")
        self.flag = flag


def define_flags(flag_values=flags.FLAGS):
    """Defines one absl flag per `TrainConfig` field (same name, default, help, choices, bounds).

    Called by `xcos_tf.train.main`'s module, never at import; a second call is a no-op.
    """
    for field in dataclasses.fields(TrainConfig):
        if field.name in flag_values:
            continue
        meta = field.metadata
        bounds = {key: meta[key] for key in ("lower_bound", "upper_bound") if meta[key] is not None}
        if meta["choices"] is not None:
            flags.DEFINE_enum(field.name, field.default, list(meta["choices"]), meta["help"], flag_values=flag_values)
        elif field.type is bool:
            flags.DEFINE_bool(field.name, field.default, meta["help"], flag_values=flag_values)
        elif field.type is int:
            flags.DEFINE_integer(field.name, field.default, meta["help"], flag_values=flag_values, **bounds)
        elif field.type is float:
            flags.DEFINE_float(field.name, field.default, meta["help"], flag_values=flag_values, **bounds)
        elif field.type is tuple:
            flags.DEFINE_list(field.name, list(field.default), meta["help"], flag_values=flag_values)
        else:
            flags.DEFINE_string(field.name, field.default, meta["help"], flag_values=flag_values)
    return flag_values


def _check_folder_path(flag, path):
    """A folder to create or reuse: refuses a path that is, or lies under, a file (local paths only)."""
    if not path or "://" in path:
        return
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == os.path.abspath(path) else f"lies under the file {existing!r}"
        raise ConfigError(flag, f"must be a folder: {path!r} {where}")


def _check_globs(flag, patterns):
    for pattern in patterns:
        if not glob.glob(pattern):
            raise ConfigError(flag, f"matches no file: {pattern!r}")


def init_backbone_kind(spec):
    """('onnx' | 'keras' | 'weights' | None, path) of an --init_backbone value."""
    if spec.startswith("onnx:"):
        return "onnx", spec[len("onnx:"):]
    if spec.endswith(".weights.h5"):
        return "weights", spec
    if spec.endswith(".keras"):
        return "keras", spec
    return None, spec
