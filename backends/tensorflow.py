"""TensorFlow wiring: the XLA-compiled fused NHA ("xla") serves "auto"."""

import tensorflow as tf

_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _check_static(call, names, time_axis):
    """Raises NotImplementedError unless XLA can tile the call statically."""
    for name in names:
        shape = call[name].shape
        if shape.rank is None or any(d is None for d in shape[1:]):
            raise NotImplementedError(
                f"`{name}` has shape {shape}: the xla kernel needs every "
                "dimension but the batch known when the graph is built")
    for name, x in call["state"].items():
        if any(d is None for d in x.shape[1:]):
            raise NotImplementedError(
                f"state['{name}'] has shape {x.shape}: the xla kernel needs "
                "every dimension but the batch known when the graph is built")
    dtype = tf.as_dtype(call["query"].dtype).name
    if dtype not in _DTYPES:
        raise NotImplementedError(f"dtype {dtype} is not supported")
    if time_axis and call["query"].shape[1] == 0:
        raise NotImplementedError("empty sequence")


def _xla(call):
    _check_static(call, ("query", "key", "value", "log_forget_gate",
                         "window_query", "window_key"), time_axis=True)
    from keras_nha.kernels.xla.sequence import xla_nha
    return xla_nha


def _xla_step(call):
    _check_static(call, ("query", "key", "value", "log_forget_gate",
                         "window_query", "window_key"), time_axis=False)
    from keras_nha.kernels.xla.step import xla_nha_step
    return xla_nha_step


def fast_paths():
    return {"xla": _xla}


def fast_step_paths():
    return {"xla": _xla_step}


def is_concrete(x):
    return tf.executing_eagerly() and hasattr(x, "numpy")
