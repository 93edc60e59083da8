"""JAX wiring: the Pallas kernels (`implementation="pallas"`).

On a GPU the kernels lower through Pallas' Triton backend and "auto" picks
them. Elsewhere `implementation="pallas"` still runs them, in Pallas'
interpreter (slow; that is how CI checks them), and "auto" keeps to the
portable chunked path.
"""

import collections.abc
import functools
import inspect

import jax

_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
_LARGEST_SLOTS = 128
_LARGEST_HEAD_DIM = 256


class _FastPaths(collections.abc.Mapping):
    """`{name: loader}`; iteration ("auto") lists only kernels native here.

    Every kernel stays reachable by name, so `implementation="pallas"` runs
    interpreted on CPU while "auto" there falls back to the chunked path.
    """

    def __init__(self, loaders, native):
        self._loaders = loaders
        self._native = native

    def __getitem__(self, name):
        return self._loaders[name]

    def __iter__(self):
        return iter(name for name in self._loaders if self._native)

    def __len__(self):
        return len(self._loaders) if self._native else 0


def _on_gpu():
    return jax.default_backend() == "gpu"


def _check(call):
    """Raises NotImplementedError for calls the kernels do not cover."""
    query, key, value = call["query"], call["key"], call["value"]
    gate = call["log_forget_gate"]
    for name in ("query", "key", "value", "window_query", "window_key"):
        dtype = str(call[name].dtype)
        if dtype not in _FLOAT_DTYPES:
            raise NotImplementedError(
                f"the Pallas kernels take {', '.join(_FLOAT_DTYPES)} inputs; "
                f"`{name}` is {dtype}.")
    if gate.shape[-1] > _LARGEST_SLOTS:
        raise NotImplementedError(
            f"the Pallas kernels take at most {_LARGEST_SLOTS} slots; got "
            f"{gate.shape[-1]}.")
    for name, dim in (("key_dim", key.shape[-1]), ("value_dim",
                                                   value.shape[-1])):
        if dim > _LARGEST_HEAD_DIM:
            raise NotImplementedError(
                f"the Pallas kernels take head dims up to {_LARGEST_HEAD_DIM};"
                f" {name} is {dim}.")
    if call["window_query"].dtype != query.dtype or (
            call["window_key"].dtype != key.dtype):
        raise NotImplementedError(
            "the Pallas kernels need window_query/window_key in the dtype of "
            "query/key.")


@functools.lru_cache(maxsize=None)
def _compiled(kernel):
    """`kernel` under `jax.jit` (Python-level arguments stay static)."""
    names = inspect.signature(kernel).parameters
    return jax.jit(kernel, static_argnames=[
        n for n in ("window_size", "scale", "chunk_size") if n in names])


def _load_sequence(call):
    _check(call)
    from keras_nha.kernels.pallas.sequence import pallas_nha
    return _sharing_inputs(_compiled(pallas_nha))


def _sharing_inputs(kernel):
    """`kernel` told (window_query / window_key None) when the window reads
    the query / key arrays themselves: under `jax.jit` the same array
    passed twice becomes two tracers, and the kernels can add the two
    gradients of one array inside (`KernelConfig.grads_into_window`)."""
    @functools.wraps(kernel)
    def run(query, key, *args, window_query, window_key, **kwargs):
        return kernel(query, key, *args, **kwargs,
                      window_query=None if window_query is query
                      else window_query,
                      window_key=None if window_key is key else window_key)
    run.__wrapped__ = kernel.__wrapped__  # the kernel itself, as before
    return run


# `backends._fast` hands this loader `state=None` for a fresh sequence:
# `pallas_nha` then reads the new tokens in place (no empty ring to join).
_load_sequence.takes_fresh_state = True


def _load_step(call):
    _check(call)
    from keras_nha.kernels.pallas.decode import pallas_step
    return _compiled(pallas_step)


def fast_paths():
    return _FastPaths({"pallas": _load_sequence}, native=_on_gpu())


def fast_step_paths():
    return _FastPaths({"pallas": _load_step}, native=_on_gpu())


def portable(kernel):
    """The portable kernels, compiled (eager op-by-op dispatch is slow).

    The reference stays eager: compiling its unrolled T-step loop (and its
    gradient) takes far longer than running it.
    """
    from keras_nha.kernels.reference import reference_nha
    return kernel if kernel is reference_nha else _compiled(kernel)


def is_concrete(x):
    return not isinstance(x, jax.core.Tracer)
