"""TensorFlow wiring: the XLA-compiled fused NHA ("xla") serves "auto".

The kernel compiles with XLA on CPU and GPU alike. It refuses (and "auto"
falls back to the chunked path) only when a dimension other than the batch
is unknown while the graph is built, or for dtypes other than float16,
bfloat16, float32 and float64.
"""

import functools

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


@functools.lru_cache(maxsize=None)
def _graph(kernel):
    return tf.function(kernel)


def portable(kernel):
    """The chunked path as one TF graph (op-by-op eager dispatch is slow).

    The reference stays eager: its unrolled T-step graph builds slowly.
    """
    from keras_nha.kernels.reference import reference_nha
    return kernel if kernel is reference_nha else _graph(kernel)


def is_concrete(x):
    return tf.executing_eagerly() and hasattr(x, "numpy")
