"""xcos_tf: explainable face verification (xCos) in Keras and TensorFlow.

`xcos_tf.verify(photo_a, photo_b)` and `xcos_tf.load(model_dir)` (see `xcos_tf.api`) are
imported on first use, so `import xcos_tf` stays light: no TensorFlow, no OpenCV.
"""
__version__ = "0.1.0"

_API = ("verify", "load", "FaceModel")


def __getattr__(name):
    if name in _API:
        from xcos_tf import api

        return getattr(api, name)
    raise AttributeError(f"module 'xcos_tf' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
