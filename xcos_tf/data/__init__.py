"""Data: raw photos -> aligned faces (`align`) -> TFRecord shards (`records`) -> tf.data (`pipeline`).

Importing this package imports nothing heavy: `align` and `pairs` use only numpy and OpenCV
(the TFLite tool runs them without TensorFlow); `records` and `pipeline` import TensorFlow.
"""
