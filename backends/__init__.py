"""Per-backend wiring: which implementation serves a call.

Each backend module (`jax`, `tensorflow`, `torch`) exposes

- `fast_paths()` and `fast_step_paths()`: ordered `{name: loader}`, fastest
  first. `loader(call)` returns a kernel with the signature of
  `kernels.chunked.chunked_nha` (or `kernels.step.nha_step`), or raises
  `NotImplementedError(reason)` when it cannot serve `call` (a dict with the
  validated arguments).
- `is_concrete(x)`: True when `x` holds values (eager), False under tracing.
- `portable(kernel)`: the portable kernel as this backend runs it best (JAX
  compiles it with `jax.jit`; eager op-by-op dispatch is slow there).

`call["state"]` is None for a fresh sequence. The portable kernels take that
as is (and skip the empty ring); a loader that sets `takes_fresh_state =
True` gets it too, every other loader gets (and its kernel is bound to) the
zero state.
"""

import functools
import importlib
import inspect

import keras

from keras_nha.kernels import state as state_lib
from keras_nha.kernels.chunked import chunked_nha
from keras_nha.kernels.reference import reference_nha
from keras_nha.kernels.step import nha_step

IMPLEMENTATIONS = ("auto", "reference", "chunked", "triton", "pallas", "xla")
OWNER = {"triton": "torch", "pallas": "jax", "xla": "tensorflow"}
PORTABLE = {"reference": reference_nha, "chunked": chunked_nha}
PORTABLE_STEP = {"reference": nha_step, "chunked": nha_step}


def backend_module():
    return importlib.import_module(
        f"keras_nha.backends.{keras.config.backend()}")


def _portable(kernel, chunk_size):
    compiled = backend_module().portable(kernel)
    if chunk_size is None or kernel is not chunked_nha:
        return compiled
    return functools.partial(compiled, chunk_size=chunk_size)


@functools.lru_cache(maxsize=None)
def _skips_state(kernel):
    """Whether a fast kernel can skip building the state (`return_state`)."""
    return "return_state" in inspect.signature(kernel).parameters


def _fast(loader, call, return_state):
    """`loader(call)`, told to skip the state when nobody reads it."""
    fresh = call["state"] is None and not getattr(loader, "takes_fresh_state",
                                                  False)
    if fresh:
        call = {**call, "state": state_lib.fresh_state(**call)}
    kernel = loader(call)
    if not return_state and _skips_state(kernel):
        kernel = functools.partial(kernel, return_state=False)
    if fresh:
        kernel = functools.partial(_run_with_state, kernel, call["state"])
    return kernel


def _run_with_state(kernel, state, /, **call):
    return kernel(**{**call, "state": state})


def _select(implementation, call, portable, fast, chunk_size=None,
            return_state=True):
    if implementation in portable:
        return _portable(portable[implementation], chunk_size)
    if implementation == "auto":
        for loader in fast.values():
            try:
                return _fast(loader, call, return_state)
            except NotImplementedError:
                continue
        return _portable(portable["chunked"], chunk_size)
    backend = keras.config.backend()
    if OWNER[implementation] != backend:
        raise ValueError(
            f"implementation={implementation!r} runs on the "
            f"{OWNER[implementation]} backend (KERAS_BACKEND="
            f"{OWNER[implementation]}); the active backend is {backend}.")
    if implementation not in fast:
        raise ValueError(
            f"implementation={implementation!r} is not available in this "
            "installation of keras_nha.")
    try:
        return _fast(fast[implementation], call, return_state)
    except NotImplementedError as error:
        raise ValueError(
            f"implementation={implementation!r} cannot serve this call: "
            f"{error}") from None


def select(implementation, call, chunk_size=None, return_state=True):
    """The sequence kernel for `implementation` ("auto" picks the fastest).

    `chunk_size` is bound to the portable chunked path when that serves the
    call; the other kernels choose their own blocks. With `return_state`
    False, a fast kernel that takes `return_state` is told to skip building
    the state (it then returns None for it).
    """
    return _select(implementation, call, PORTABLE,
                   backend_module().fast_paths(), chunk_size, return_state)


def select_step(implementation, call):
    """The one-token decode kernel for `implementation`."""
    return _select(implementation, call, PORTABLE_STEP,
                   backend_module().fast_step_paths())


def is_concrete(x):
    return backend_module().is_concrete(x)
