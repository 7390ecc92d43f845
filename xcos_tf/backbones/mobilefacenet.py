"""MobileFaceNet (Chen et al., 2018) up to its last 7x7x512 feature map."""
import keras

from xcos_tf.backbones import common


def _conv_block(x, filters, kernel_size, strides, name, depthwise=False, linear=False):
    x = common.torch_conv(x, filters, kernel_size, strides, name=f"{name}_conv", depthwise=depthwise)
    x = common.batch_norm(x, name=f"{name}_bn")
    return x if linear else common.prelu(x, name=f"{name}_prelu")


def _depthwise_unit(x, out_channels, expand_channels, strides, name):
    """Inverted bottleneck: 1x1 expand, 3x3 depthwise, linear 1x1 project."""
    y = _conv_block(x, expand_channels, 1, 1, f"{name}_expand")
    y = _conv_block(y, expand_channels, 3, strides, f"{name}_dw", depthwise=True)
    return _conv_block(y, out_channels, 1, 1, f"{name}_project", linear=True)


def _residual_stage(x, channels, expand_channels, num_units, name):
    for i in range(num_units):
        x = keras.layers.Add(name=f"{name}_{i}_add")(
            [x, _depthwise_unit(x, channels, expand_channels, 1, f"{name}_{i}")]
        )
    return x


def mobilefacenet(input_shape=(112, 112, 3), name="mobilefacenet"):
    """MobileFaceNet body: RGB pixels 0..255 -> (H/16, W/16, 512), about 1 M parameters.

    The layout follows the insightface / foamliu PyTorch MobileFaceNet; the global
    depthwise conv and the 128-d linear embedding that follow `conv_6_sep` are left
    out, since xCos puts its grid head on the 7x7 map instead.
    """
    input_shape = common.check_input_shape(input_shape, name)
    image, x = common.pixel_input(input_shape)
    x = _conv_block(x, 64, 3, 2, "conv1")
    x = _conv_block(x, 64, 3, 1, "conv2_dw", depthwise=True)
    x = _depthwise_unit(x, 64, 128, 2, "conv_23")
    x = _residual_stage(x, 64, 128, 4, "conv_3")
    x = _depthwise_unit(x, 128, 256, 2, "conv_34")
    x = _residual_stage(x, 128, 256, 6, "conv_4")
    x = _depthwise_unit(x, 128, 512, 2, "conv_45")
    x = _residual_stage(x, 128, 256, 2, "conv_5")
    feature_map = _conv_block(x, 512, 1, 1, "conv_6_sep")
    return keras.Model(image, feature_map, name=name)
