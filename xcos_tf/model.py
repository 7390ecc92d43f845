"""The xCos training model and the inference models built from it."""
import collections
import math
import os

import keras
from keras import ops

from xcos_tf import layers
from xcos_tf.data.records import UNLABELLED

MARGIN_HEADS = {"cosface": layers.CosFace, "arcface": layers.ArcFace}
# How far below the lowest cosine elsewhere the occluded cells' lowest one is pushed.
OCCLUSION_MARGIN = 0.05
GRID_HEADS = ("conv", "positionwise")

Verifier = collections.namedtuple("Verifier", ["verify", "embed", "compare"])
Verifier.__doc__ = """The three inference models that share one set of weights.

verify: {"image_a", "image_b"} (RGB pixels 0..255) -> {"score", "cos_map", "attention_map"}
embed: {"image"} -> {"embedding" (L2-normalised, flattened grid), "grid"}
compare: {"grid_a", "grid_b"} -> {"score", "cos_map", "attention_map"}
"""


@keras.saving.register_keras_serializable(package="xcos_tf")
class XCosTrainer(keras.Model):
    """Backbone -> grid head -> (margin head on each face, XCosLayer on the pair).

    The loss is `ce_weight * CE(both faces) + xcos_weight * MSE(score, teacher_cos)`:
    the margin softmax keeps the grid an identity embedding and the MSE teaches the
    xCos score to agree with a frozen teacher's cosine. Faces labelled `UNLABELLED`
    (-1) contribute only to the MSE term. With `occlusion_weight`, batches whose face B may
    wear an occluder (`coverage_b`, xcos_tf.data.occluded_features) add
    `occlusion_weight * occlusion_ranking_loss`.

    Args:
        backbone: `keras.Model`, aligned face (RGB 0..255) -> (H, W, C) feature map.
        num_classes: int, identities seen by the margin head.
        grid_channels: int, channels per grid cell. Defaults to 32.
        grid_head: str, `"conv"` (`GridHead`, the paper's shared 1x1 conv) or `"positionwise"`
            (`PositionwiseGridHead`: one linear map per cell, centred). Defaults to `"conv"`.
        context_init: float, the positionwise head's initial context weight. Defaults to 0.
        learn_context: bool, whether the positionwise head trains its context weights.
        margin: str, `"cosface"` or `"arcface"`. Defaults to `"cosface"`.
        margin_scale: optional float, the head's scale (its default when None).
        margin_value: optional float, the head's margin (its default when None).
        attention: str, the XCosLayer attention mode. Defaults to `"learned"`.
        symmetric: bool, symmetric attention. Defaults to True.
        attention_prior: bool, learned attention added to the log norm product of the cells
            (`XCosLayer(attention_prior=True)`). Defaults to False.
        ce_weight: float, weight of the margin-softmax loss. Defaults to 1.
        xcos_weight: float, weight of the MSE to the teacher cosine. Defaults to 1.
        occlusion_weight: float, weight of `occlusion_ranking_loss`. Defaults to 0.
        **kwargs: other keyword arguments passed to `keras.Model`.

    Call arguments:
        inputs: dict with `"image_a"`, `"image_b"` (batch, H, W, 3) (`call_on_feature_maps`
            takes `"feature_a"`, `"feature_b"` instead: the frozen backbone's cached outputs); and
            optionally `"label_a"`, `"label_b"` (batch,) int labels (the margin needs them).

    Returns a dict with the XCosLayer outputs plus `"logits"` (2 * batch, classes: faces
    a then faces b; only with ce_weight > 0) and `"embedding"` (2 * batch, cells * channels).

    Example:
    >>> trainer = XCosTrainer(xcos_tf.backbones.get("mobilefacenet"), num_classes=100)
    >>> trainer.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9),
    ...                 attention_optimizer=keras.optimizers.Adam(1e-3))
    Training runs through `xcos_tf.training.loop.make_train_step` (the one training step, for
    every tf.distribute strategy); `compute_loss_terms` and `apply_loss_gradients` are its parts.
    """

    def __init__(
        self,
        backbone,
        num_classes,
        grid_channels=32,
        margin="cosface",
        margin_scale=None,
        margin_value=None,
        attention="learned",
        fixed_weights=None,
        symmetric=True,
        ce_weight=1.0,
        xcos_weight=1.0,
        grid_head="conv",
        context_init=0.0,
        learn_context=False,
        attention_prior=False,
        occlusion_weight=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if grid_head not in GRID_HEADS:
            raise ValueError(f"`grid_head` must be one of {GRID_HEADS}. Received: grid_head={grid_head!r}")
        if grid_head == "conv" and (context_init != 0.0 or learn_context):
            raise ValueError(
                "`context_init` and `learn_context` belong to grid_head='positionwise'. "
                f"Received: grid_head={grid_head!r}, context_init={context_init!r}, learn_context={learn_context!r}"
            )
        if margin not in MARGIN_HEADS:
            raise ValueError(f"`margin` must be one of {tuple(MARGIN_HEADS)}. Received: margin={margin!r}")
        if occlusion_weight < 0:
            raise ValueError(f"`occlusion_weight` must be >= 0. Received: occlusion_weight={occlusion_weight}")
        if ce_weight < 0 or xcos_weight < 0 or ce_weight + xcos_weight == 0:
            raise ValueError(
                f"Loss weights must be >= 0 and not both 0. Received: ce_weight={ce_weight}, xcos_weight={xcos_weight}"
            )
        # === Layers ===
        self.backbone = backbone
        if grid_head == "positionwise":
            self.grid_head = layers.PositionwiseGridHead(
                grid_channels, context_init=context_init, learn_context=learn_context, name="grid_head"
            )
        else:
            self.grid_head = layers.GridHead(grid_channels, name="grid_head")
        self.xcos = layers.XCosLayer(
            attention=attention, fixed_weights=fixed_weights, symmetric=symmetric, attention_prior=attention_prior,
            name="xcos",
        )
        head_args = {}
        if margin_scale is not None:
            head_args["scale"] = margin_scale
        if margin_value is not None:
            head_args["margin"] = margin_value
        # Without a CE term there is no margin head: its matmul over every identity would cost
        # more than the rest of a step on cached backbone maps.
        self.margin_head = None
        if ce_weight > 0:
            self.margin_head = MARGIN_HEADS[margin](num_classes, dtype="float32", name="margin_head", **head_args)
        self.attention_optimizer = None
        self.backbone_optimizer = None
        # === Config ===
        self.num_classes = num_classes
        self.grid_channels = grid_channels
        self.margin = margin
        self.margin_scale = margin_scale
        self.margin_value = margin_value
        self.attention = attention
        self.fixed_weights = fixed_weights
        self.symmetric = symmetric
        self.ce_weight = float(ce_weight)
        self.xcos_weight = float(xcos_weight)
        self.grid_head_kind = grid_head
        self.context_init = float(context_init)
        self.learn_context = bool(learn_context)
        self.attention_prior = bool(attention_prior)
        self.occlusion_weight = float(occlusion_weight)

    def call(self, inputs, training=False):
        # One backbone pass over both faces of every pair.
        images = ops.concatenate([inputs["image_a"], inputs["image_b"]], 0)
        return self._head_outputs(self.backbone(images, training=training), inputs, training)

    def call_on_feature_maps(self, inputs, training=False):
        """As `call`, on `"feature_a"`, `"feature_b"`: the frozen backbone's cached feature maps
        of the faces (xcos_tf.data.features) instead of the images; the backbone is skipped."""
        feature_maps = ops.concatenate([inputs["feature_a"], inputs["feature_b"]], 0)
        return self._head_outputs(feature_maps, inputs, training)

    def _head_outputs(self, feature_maps, inputs, training):
        """Grid head, XCosLayer and margin head on the feature maps of faces a then faces b."""
        grid = self.grid_head(feature_maps, training=training)
        grid_a, grid_b = ops.split(grid, 2, axis=0)
        embedding = unit_embedding(grid)
        labels = None
        if "label_a" in inputs and "label_b" in inputs:
            labels = ops.maximum(ops.concatenate([inputs["label_a"], inputs["label_b"]], 0), 0)
        outputs = dict(self.xcos(grid_a, grid_b, training=training))
        if self.margin_head is not None:
            outputs["logits"] = self.margin_head(embedding, labels, training=training)
        outputs["embedding"] = embedding
        return outputs

    def compute_loss_terms(self, batch, outputs):
        """Per-replica mean loss terms of a batch of pairs: loss, ce_loss, xcos_loss (and
        occlusion_loss with `occlusion_weight`)."""
        ce_loss = ops.zeros((), "float32")
        if "logits" in outputs:
            labels = ops.cast(ops.concatenate([batch["label_a"], batch["label_b"]], 0), "int32")
            labelled = ops.cast(labels != UNLABELLED, "float32")
            ce = keras.losses.sparse_categorical_crossentropy(
                ops.maximum(labels, 0), ops.cast(outputs["logits"], "float32"), from_logits=True
            )
            ce_loss = ops.sum(ce * labelled) / ops.maximum(ops.sum(labelled), 1.0)
        teacher_cos = ops.cast(batch["teacher_cos"], "float32")
        xcos_loss = ops.mean(ops.square(outputs["score"] - teacher_cos))
        loss = self.ce_weight * ce_loss + self.xcos_weight * xcos_loss
        terms = {"ce_loss": ce_loss, "xcos_loss": xcos_loss}
        if self.occlusion_weight:
            same = ops.logical_and(batch["label_a"] == batch["label_b"], batch["label_a"] >= 0)
            terms["occlusion_loss"] = occlusion_ranking_loss(outputs["cos_map"], batch["coverage_b"], same)
            loss = loss + self.occlusion_weight * terms["occlusion_loss"]
        return {"loss": loss, **terms}

    def compile(self, optimizer="sgd", attention_optimizer=None, backbone_optimizer=None, **kwargs):
        """As `keras.Model.compile`, plus optional separate optimizers for the attention and the backbone.

        The paper trains the backbone, grid head and margin head by SGD with momentum and
        the attention module by Adam; one optimizer for everything is the default. A
        `backbone_optimizer` fine-tunes a pretrained backbone at its own (lower) rate.
        """
        super().compile(optimizer=optimizer, **kwargs)
        self.attention_optimizer = keras.optimizers.get(attention_optimizer) if attention_optimizer else None
        self.backbone_optimizer = keras.optimizers.get(backbone_optimizer) if backbone_optimizer else None

    def optimizer_groups(self):
        """(optimizer, variables) pairs that together cover every trainable variable once."""
        groups = []
        taken = set()
        for optimizer, layer in ((self.attention_optimizer, self.xcos), (self.backbone_optimizer, self.backbone)):
            if optimizer is not None:
                groups.append((optimizer, layer.trainable_variables))
                taken.update(id(v) for v in layer.trainable_variables)
        rest = [v for v in self.trainable_variables if id(v) not in taken]
        return [(self.optimizer, rest)] + groups

    def apply_loss_gradients(self, tape, loss):
        """Differentiates the unscaled `loss` (recorded on `tape`) and steps each optimizer on its variables.

        Without loss scaling one backward pass serves every group. A `LossScaleOptimizer`
        has its own dynamic scale, so then each group takes its own pass with its scale as
        the output gradient (the tape must be persistent when there are several groups).
        """
        groups = [(optimizer, variables) for optimizer, variables in self.optimizer_groups() if variables]
        if not any(isinstance(optimizer, keras.optimizers.LossScaleOptimizer) for optimizer, _ in groups):
            gradients = tape.gradient(loss, [v for _, variables in groups for v in variables])
            for optimizer, variables in groups:
                optimizer.apply(gradients[: len(variables)], variables)
                gradients = gradients[len(variables):]
            return
        for optimizer, variables in groups:
            loss_scale = optimizer.scale_loss(ops.ones_like(loss))
            optimizer.apply(tape.gradient(loss, variables, output_gradients=loss_scale), variables)

    def get_compile_config(self):
        config = super().get_compile_config()
        for key in ("attention_optimizer", "backbone_optimizer"):
            if config is not None and getattr(self, key) is not None:
                config[key] = keras.saving.serialize_keras_object(getattr(self, key))
        return config

    def compile_from_config(self, config):
        # Keras' own version skips models with a custom `compile`; this one restores both
        # optimizers, so a reloaded .keras trainer can go on training as it was compiled.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            for optimizer, variables in self.optimizer_groups():
                optimizer.build(variables)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "backbone": keras.saving.serialize_keras_object(self.backbone),
                "num_classes": self.num_classes,
                "grid_channels": self.grid_channels,
                "margin": self.margin,
                "margin_scale": self.margin_scale,
                "margin_value": self.margin_value,
                "attention": self.attention,
                "fixed_weights": self.fixed_weights,
                "symmetric": self.symmetric,
                "ce_weight": self.ce_weight,
                "xcos_weight": self.xcos_weight,
                "grid_head": self.grid_head_kind,
                "context_init": self.context_init,
                "learn_context": self.learn_context,
                "attention_prior": self.attention_prior,
                "occlusion_weight": self.occlusion_weight,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)


def occlusion_ranking_loss(cos_map, coverage, same, margin=OCCLUSION_MARGIN):
    """Mean over the same-person pairs whose face B is partly occluded of
    `relu(margin + min cos over the occluded cells - min cos over the others)`: zero once the
    lowest cell of the cos map lies under the occluder by `margin` (what the evaluation's
    occluder localisation counts). A cell is occluded when the occluder covers at least half of it.

    Args:
        cos_map: float [B, H, W]; coverage: float [B, H, W], the share of each cell of face B
            under the occluder (zeros for a clean face); same: bool [B].
    """
    cos = ops.reshape(ops.cast(cos_map, "float32"), (ops.shape(cos_map)[0], -1))
    covered = ops.reshape(coverage, ops.shape(cos)) >= 0.5
    above = 2.0  # above any cosine: masks the other cells out of a minimum
    hidden = ops.min(ops.where(covered, cos, above), axis=1)
    visible = ops.min(ops.where(covered, above, cos), axis=1)
    counted = ops.cast(same & ops.any(covered, axis=1) & ops.any(ops.logical_not(covered), axis=1), "float32")
    return ops.sum(ops.relu(margin + hidden - visible) * counted) / ops.maximum(ops.sum(counted), 1.0)


def unit_embedding(grid):
    """The identity embedding of a grid: flattened, L2-normalised (training and inference alike)."""
    # The cell count is static; the batch may not be (a symbolic Keras input).
    flat = ops.reshape(grid, (-1, math.prod(grid.shape[1:])))
    flat = ops.cast(flat, "float32")
    return flat / ops.maximum(ops.norm(flat, axis=-1, keepdims=True), 1e-12)


def build_trainer(backbone, num_classes, image_shape=(112, 112, 3), **kwargs):
    """Builds an `XCosTrainer` with all its weights created (needed before restoring)."""
    trainer = XCosTrainer(backbone, num_classes, **kwargs)
    images = ops.zeros((1,) + tuple(image_shape))
    labels = ops.zeros((1,), "int32")
    trainer({"image_a": images, "image_b": images, "label_a": labels, "label_b": labels})
    return trainer


def build_verifier(trainer_or_weights):
    """The inference models (`Verifier`) of a trainer, or of a trainer saved as `.keras`.

    The training-only margin head is dropped; verify, embed and compare share the
    backbone, grid head and XCosLayer weights.
    """
    trainer = trainer_or_weights
    if isinstance(trainer, (str, os.PathLike)):
        path = os.fspath(trainer)
        if not path.endswith(".keras") or not os.path.isfile(path):
            raise ValueError(f"Expected an XCosTrainer or an existing `.keras` file. Received: {path!r}")
        trainer = keras.saving.load_model(path, compile=False)
    if not isinstance(trainer, XCosTrainer):
        raise ValueError(f"Expected an XCosTrainer. Received: {type(trainer).__name__}")
    image_shape = tuple(trainer.backbone.input_shape[1:])
    grid_shape = tuple(trainer.grid_head.compute_output_shape(trainer.backbone.output_shape)[1:])

    def grid_of(image):
        return trainer.grid_head(trainer.backbone(image, training=False), training=False)

    def named(outputs):
        # Identity layers give the dict outputs stable, signature-friendly names.
        return {key: keras.layers.Identity(name=key)(value) for key, value in outputs.items()}

    image = keras.Input(image_shape, name="image")
    grid = grid_of(image)
    embedding = unit_embedding(grid)
    embed = keras.Model({"image": image}, named({"embedding": embedding, "grid": grid}), name="embed")

    grid_a, grid_b = keras.Input(grid_shape, name="grid_a"), keras.Input(grid_shape, name="grid_b")
    compare = keras.Model(
        {"grid_a": grid_a, "grid_b": grid_b}, named(trainer.xcos(grid_a, grid_b, training=False)), name="compare"
    )

    image_a, image_b = keras.Input(image_shape, name="image_a"), keras.Input(image_shape, name="image_b")
    verify = keras.Model(
        {"image_a": image_a, "image_b": image_b},
        named(trainer.xcos(grid_of(image_a), grid_of(image_b), training=False)),
        name="verify",
    )
    return Verifier(verify=verify, embed=embed, compare=compare)
