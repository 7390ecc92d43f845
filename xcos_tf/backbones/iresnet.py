"""The insightface IR and IR-SE bottleneck stacks (Deng et al., ArcFace), body only."""
import keras

from xcos_tf.backbones import common

# (units per stage) for each depth, as insightface's `get_blocks` defines them.
STAGE_UNITS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}
STAGE_CHANNELS = (64, 128, 256, 512)


def _squeeze_excite(x, channels, name, reduction=16):
    s = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pool")(x)
    s = keras.layers.Conv2D(channels // reduction, 1, use_bias=False, name=f"{name}_fc1")(s)
    s = keras.layers.ReLU(name=f"{name}_relu")(s)
    s = keras.layers.Conv2D(channels, 1, use_bias=False, activation="sigmoid", name=f"{name}_fc2")(s)
    return keras.layers.Multiply(name=f"{name}_scale")([x, s])


def _bottleneck_ir(x, in_channels, depth, strides, use_se, name):
    """BN-conv-PReLU-conv-BN residual; a strided 1x1 shortcut only where the shape changes."""
    if in_channels == depth:
        shortcut = x if strides == 1 else keras.layers.MaxPooling2D(1, strides, name=f"{name}_sc_pool")(x)
    else:
        shortcut = keras.layers.Conv2D(depth, 1, strides=strides, use_bias=False, name=f"{name}_sc_conv")(x)
        shortcut = common.batch_norm(shortcut, name=f"{name}_sc_bn")
    r = common.batch_norm(x, name=f"{name}_bn1")
    r = common.torch_conv(r, depth, 3, 1, name=f"{name}_conv1")
    r = common.prelu(r, name=f"{name}_prelu")
    r = common.torch_conv(r, depth, 3, strides, name=f"{name}_conv2")
    r = common.batch_norm(r, name=f"{name}_bn2")
    if use_se:
        r = _squeeze_excite(r, depth, name=f"{name}_se")
    return keras.layers.Add(name=f"{name}_add")([r, shortcut])


def iresnet(depth, use_se, input_shape=(112, 112, 3), name=None):
    """IR-`depth` (IR-SE with `use_se`): RGB pixels 0..255 -> (H/16, W/16, 512).

    The fully connected output layer of insightface's Backbone is left out: the xCos grid
    head replaces it.
    """
    name = name or f"ir{'_se' if use_se else ''}{depth}"
    input_shape = common.check_input_shape(input_shape, name)
    image, x = common.pixel_input(input_shape)
    x = common.torch_conv(x, 64, 3, 1, name="input_conv")
    x = common.batch_norm(x, name="input_bn")
    x = common.prelu(x, name="input_prelu")
    in_channels = 64
    for stage, (units, channels) in enumerate(zip(STAGE_UNITS[depth], STAGE_CHANNELS)):
        for unit in range(units):
            x = _bottleneck_ir(
                x, in_channels, channels, 2 if unit == 0 else 1, use_se, name=f"stage{stage + 1}_unit{unit + 1}"
            )
            in_channels = channels
    return keras.Model(image, x, name=name)
