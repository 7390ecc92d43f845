"""Backbones: an aligned face (RGB pixels 0..255) -> a (H/16, W/16, 512) feature map."""
import functools

from xcos_tf.backbones.iresnet import iresnet
from xcos_tf.backbones.linear_tail import LinearTail, read_linear_tail
from xcos_tf.backbones.mobilefacenet import mobilefacenet
from xcos_tf.backbones.onnx_import import from_onnx

_BUILDERS = {
    "mobilefacenet": mobilefacenet,
    "ir50": functools.partial(iresnet, 50, False),
    "ir_se50": functools.partial(iresnet, 50, True),
    "ir100": functools.partial(iresnet, 100, False),
    "ir_se100": functools.partial(iresnet, 100, True),
}
NAMES = tuple(_BUILDERS)


def get(name, input_shape=(112, 112, 3)):
    """Builds the backbone called `name` (one of `NAMES`) as a Keras model."""
    if name not in _BUILDERS:
        raise ValueError(f"Unknown backbone {name!r}; valid choices: {', '.join(NAMES)}.")
    return _BUILDERS[name](input_shape=input_shape, name=name)
