"""keras_nha: Native Hybrid Attention (arXiv 2510.07019) for Keras 3."""

from keras_nha import ops
from keras_nha import layers
from keras_nha.layers import NHALayer
from keras_nha.layers import NativeHybridAttention

__version__ = "0.1.0"
