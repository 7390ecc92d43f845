"""Every named backbone builds to a 7x7x512 map with the parameter count its name promises."""
import numpy as np
import pytest

from xcos_tf import backbones

# Parameters without the output layer that xCos replaces, as counted from insightface's
# definitions: MobileFaceNet up to conv_6_sep ~0.93 M, IR-SE-50 ~31 M.
EXPECTED_PARAMS = {
    "mobilefacenet": 0.93e6,
    "ir50": 30.75e6,
    "ir_se50": 31.0e6,
    "ir100": 52.3e6,
    "ir_se100": 52.7e6,
}


@pytest.mark.parametrize("name", backbones.NAMES)
def test_backbone_builds_to_a_7x7x512_map(name):
    model = backbones.get(name)
    assert model.output_shape == (None, 7, 7, 512)
    assert model.count_params() == pytest.approx(EXPECTED_PARAMS[name], rel=0.03)


def test_mobilefacenet_runs_on_raw_pixels():
    model = backbones.get("mobilefacenet")
    faces = np.random.default_rng(0).uniform(0, 255, (2, 112, 112, 3)).astype("float32")
    feature_map = np.asarray(model(faces))
    assert feature_map.shape == (2, 7, 7, 512)
    assert np.isfinite(feature_map).all()
    # The backbone scales pixels itself: its first layer maps 0..255 to [-1, 1].
    scaled = np.asarray(model.get_layer("pixel_scaling")(faces))
    assert scaled.min() >= -1.0 and scaled.max() <= 1.0


def test_other_input_sizes_give_other_grids():
    assert backbones.get("mobilefacenet", input_shape=(128, 96, 3)).output_shape == (None, 8, 6, 512)


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="ir_se50"):
        backbones.get("resnet18")


@pytest.mark.parametrize("shape", [(112, 112), (112, 112, 1), (100, 112, 3), (112, 112.0, 3)])
def test_wrong_input_shape_names_the_valid_choice(shape):
    with pytest.raises(ValueError, match=r"\(112, 112, 3\)"):
        backbones.get("mobilefacenet", input_shape=shape)
