"""xCos layers: the grid head, the explainable cosine and the margin heads."""
from xcos_tf.layers.batch_norm import BatchNormalization
from xcos_tf.layers.grid_head import GridHead
from xcos_tf.layers.margin_heads import ArcFace, CosFace, MarginSoftmax
from xcos_tf.layers.positionwise_grid_head import PositionwiseGridHead
from xcos_tf.layers.prelu import PReLU
from xcos_tf.layers.xcos_layer import ATTENTION_MODES, XCosLayer

__all__ = ["ArcFace", "ATTENTION_MODES", "CosFace", "GridHead", "MarginSoftmax", "PReLU", "XCosLayer"]
