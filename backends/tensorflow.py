"""TensorFlow wiring. Fast paths (XLA-compiled fused ops) register here."""

import tensorflow as tf


def fast_paths():
    return {}


def fast_step_paths():
    return {}


def is_concrete(x):
    return tf.executing_eagerly() and hasattr(x, "numpy")
