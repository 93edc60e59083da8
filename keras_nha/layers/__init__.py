"""Keras layers built on the NHA operation."""

from keras_nha.layers.nha_layer import NHALayer

NativeHybridAttention = NHALayer
