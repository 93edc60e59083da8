"""keras_nha: Native Hybrid Attention (arXiv 2510.07019) for Keras 3.

`keras_nha.ops` and `keras_nha.layers` need only keras and one backend. The
task models (`NHABackbone`, `NHACausalLM`, ...) live in `keras_nha.models`,
which needs keras-hub; they load on first access, so `import keras_nha` never
pulls keras-hub (and TensorFlow) in by itself.
"""

from keras_nha import layers
from keras_nha import ops
from keras_nha.layers import NativeHybridAttention
from keras_nha.layers import NHALayer

__version__ = "0.1.0"

_MODEL_NAMES = ("NHABackbone", "NHACausalLM", "NHACausalLMPreprocessor",
                "NHADecoderBlock", "NHATokenizer", "hybridize", "preset_path")


def __getattr__(name):
    if name in _MODEL_NAMES or name == "models":
        import importlib
        models = importlib.import_module("keras_nha.models")
        return models if name == "models" else getattr(models, name)
    raise AttributeError(f"module 'keras_nha' has no attribute {name!r}")
