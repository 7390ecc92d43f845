"""Tiny in-memory verifiers with the runtime's interface, for the explain and evaluate tests
(`StubDecompose` adds a `decompose` of the export's interface, exact on the patch verifier;
`DecomposingRuntime` a fixed one over any runtime).

The learned-attention model is the export tests' `export_testing.tiny_trainer`.

`KerasRuntime` gives a `xcos_tf.model.Verifier` the interface of `xcos_tf.runtime.load(...)`
(numpy in and out, `threshold`, `manifest`), so the tools can be tested without an export.
"""
import keras
import numpy as np
import export_testing

from xcos_tf import model


def patch_backbone(channels=16):
    """Each 16x16 patch of the 112 face -> one cell, no bias: a cell sees only its own patch,
    and a mid-grey (127.5) patch gives an all-zero cell (cosine 0 with anything)."""
    image = keras.Input((112, 112, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(image)
    x = keras.layers.Conv2D(channels, 16, strides=16, use_bias=False, name="patch")(x)
    return keras.Model(image, x, name="patch_backbone")


class KerasRuntime:
    """The runtime interface over an in-memory `Verifier`."""

    def __init__(self, verifier, threshold=None):
        self._verifier = verifier
        self.threshold = threshold
        self.manifest = {"threshold": threshold}

    @staticmethod
    def _numpy(outputs):
        return {key: np.asarray(value) for key, value in outputs.items()}

    def verify(self, image_a, image_b):
        return self._numpy(self._verifier.verify({"image_a": np.asarray(image_a, np.float32),
                                                  "image_b": np.asarray(image_b, np.float32)}))

    def embed(self, image):
        return self._numpy(self._verifier.embed({"image": np.asarray(image, np.float32)}))

    def compare(self, grid_a, grid_b):
        return self._numpy(self._verifier.compare({"grid_a": grid_a, "grid_b": grid_b}))


def patch_runtime(attention="uniform"):
    """`patch_backbone` + grid head + XCosLayer with this attention, as a runtime."""
    keras.utils.set_random_seed(0)
    trainer = model.build_trainer(patch_backbone(), num_classes=4, attention=attention)
    return KerasRuntime(model.build_verifier(trainer))


def learned_runtime(threshold=None):
    """The export tests' tiny trainer (learned attention, far from uniform) as a runtime."""
    return KerasRuntime(model.build_verifier(export_testing.tiny_trainer()), threshold=threshold)


def smooth_faces(count, seed=0):
    """Random smooth RGB uint8 112x112 images (upsampled 7x7 noise)."""
    import cv2

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(count, 7, 7, 3), dtype=np.uint8)
    return np.stack([cv2.resize(c, (112, 112), interpolation=cv2.INTER_LINEAR) for c in coarse])


class StubDecompose(KerasRuntime):
    """The patch verifier with a `decompose` of the interface the export gives
    (`decompose(image_a, image_b) -> score, contribution_map, bias`): the cosine of the two
    flattened grids split exactly per cell, `<a_i, b_i> / (|a| |b|)`, and a zero bias."""

    def __init__(self, runtime):
        super().__init__(runtime._verifier)

    def decompose(self, image_a, image_b):
        grid_a, grid_b = self.embed(image_a)["grid"], self.embed(image_b)["grid"]
        norms = (np.maximum(np.linalg.norm(grid_a.reshape(len(grid_a), -1), axis=1), 1e-12)
                 * np.maximum(np.linalg.norm(grid_b.reshape(len(grid_b), -1), axis=1), 1e-12))
        contribution_map = np.sum(grid_a * grid_b, axis=-1) / norms[:, None, None]
        return {"score": contribution_map.sum(axis=(1, 2)), "contribution_map": contribution_map,
                "bias": np.zeros(len(grid_a), np.float32)}


class DecomposingRuntime:
    """A stub of an export with a `decompose` signature: the tiny runtime plus fixed contributions."""

    CONTRIBUTIONS = np.linspace(-0.01, 0.02, 49, dtype=np.float32).reshape(1, 7, 7)
    BIAS = 0.07

    def __init__(self, runtime):
        self._runtime = runtime
        self.threshold, self.manifest = runtime.threshold, runtime.manifest
        self.calls = []

    def verify(self, image_a, image_b):
        return self._runtime.verify(image_a, image_b)

    def embed(self, image):
        return self._runtime.embed(image)

    def decompose(self, image_a, image_b):
        self.calls.append((image_a.shape, image_b.shape))
        score = self.CONTRIBUTIONS.sum(axis=(1, 2)) + self.BIAS
        return {"score": score, "contribution_map": self.CONTRIBUTIONS, "bias": np.array([self.BIAS], np.float32)}
