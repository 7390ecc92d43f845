"""xcos_tf: explainable face verification (xCos) in Keras and TensorFlow."""
__version__ = "0.1.0"
