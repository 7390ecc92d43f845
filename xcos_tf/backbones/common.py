"""Pieces shared by the backbone families: input checks, pixel scaling, torch-style convs."""
import keras

from xcos_tf.layers.batch_norm import BatchNormalization
from xcos_tf.layers.prelu import PReLU

GRID_STRIDE = 16


def check_input_shape(input_shape, name):
    """Refuses shapes that would not give a whole grid of cells."""
    shape = tuple(input_shape)
    if (
        len(shape) != 3
        or shape[2] != 3
        or any(not isinstance(d, int) or d <= 0 or d % GRID_STRIDE for d in shape[:2])
    ):
        raise ValueError(
            f"Backbone `{name}` takes input_shape=(H, W, 3) with H and W positive multiples "
            f"of {GRID_STRIDE}, e.g. (112, 112, 3) for the 7x7 grid of an aligned face. "
            f"Received: input_shape={input_shape}"
        )
    return shape


def pixel_input(input_shape, scale=1.0 / 127.5, offset=-1.0):
    """RGB pixels 0..255 in, network range out, so every exported model takes raw pixels."""
    image = keras.Input(shape=input_shape, name="image")
    return image, keras.layers.Rescaling(scale, offset=offset, name="pixel_scaling")(image)


def torch_conv(x, filters, kernel_size, strides=1, name=None, use_bias=False, depthwise=False):
    """A 'same'-padded conv that pads symmetrically like PyTorch's `padding=k//2`.

    Keras' own 'same' padding puts the extra row at the bottom for stride 2, which would
    shift every cell of the grid by half a pixel against weights trained in PyTorch.
    """
    pad = kernel_size // 2
    if pad:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
    if depthwise:
        return keras.layers.DepthwiseConv2D(
            kernel_size, strides=strides, use_bias=use_bias, name=name
        )(x)
    return keras.layers.Conv2D(
        filters, kernel_size, strides=strides, use_bias=use_bias, name=name
    )(x)


def batch_norm(x, name, epsilon=1e-5):
    # PyTorch's default epsilon and momentum, so imported statistics mean the same; the
    # fused kernel for speed (issue 17), same weights and numerics as Keras'.
    return BatchNormalization(epsilon=epsilon, momentum=0.9, name=name)(x)


def prelu(x, name):
    # One slope per channel, shared over space, as torch.nn.PReLU(channels).
    return PReLU(shared_axes=[1, 2], name=name)(x)
