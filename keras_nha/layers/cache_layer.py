"""Base class of the layers that take an NHA decode cache."""

import keras


class CacheLayer(keras.layers.Layer):
    """A Keras layer whose `call` may take a decode cache.

    Keras would autocast every float argument of `call`, the cache too:
    under mixed precision that rounds the float32 slot memory to bfloat16.
    This base converts `inputs`, and only `inputs`, itself.

    Args:
        **kwargs: `keras.layers.Layer` arguments (name, dtype, ...).

    Example:

    >>> class Passthrough(CacheLayer):
    ...     def call(self, inputs, cache=None):
    ...         return inputs if cache is None else (inputs, cache)
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._convert_input_args = False

    def __call__(self, inputs, *args, **kwargs):
        inputs = self.dtype_policy.convert_input(inputs, self.autocast,
                                                 self.input_dtype)
        return super().__call__(inputs, *args, **kwargs)
