"""PyTorch wiring. Fast paths: the Triton kernels (`kernels/triton/`).

They serve CUDA tensors, and CPU tensors when TRITON_INTERPRET=1 (Triton's
interpreter, how CI tests them). They refuse, so that "auto" falls back to the
chunked path: meta tensors and Keras' symbolic build, float64, more than 128
slots, head dims above 256, and states that require grad (the kernels return
no gradient for the incoming state).
"""

import os

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_SLOTS = 128
MAX_HEAD_DIM = 256


def _in_symbolic_build():
    try:
        from keras.src.backend.common.symbolic_scope import in_symbolic_scope
    except ImportError:  # A Keras that moved it: rely on the device checks.
        return False
    return in_symbolic_scope()


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Per CUDA device: None when the kernels can serve it, else the reason
# (asked once: a capability lookup per call costs microseconds).
_CUDA_REFUSALS = {}


def _cuda_refusal(device):
    if device not in _CUDA_REFUSALS:
        reason = None
        if torch.version.hip is not None:
            reason = "the kernels are tuned for NVIDIA GPUs"
        elif torch.cuda.get_device_capability(device) < (8, 0):
            reason = "needs an Ampere or newer GPU"
        _CUDA_REFUSALS[device] = reason
    return _CUDA_REFUSALS[device]


def _check_device(tensors):
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise NotImplementedError(f"tensors on several devices: {devices}")
    device = devices.pop()
    if device.type == "cuda":
        reason = _cuda_refusal(device)
        if reason:
            raise NotImplementedError(reason)
    elif device.type == "cpu":
        if not _interpreting():
            raise NotImplementedError(
                "CPU tensors run the Triton kernels only under "
                "TRITON_INTERPRET=1")
    else:
        raise NotImplementedError(f"tensors on the {device.type} device")


def _check(tensors, state):
    state = state or {}
    if _in_symbolic_build():
        raise NotImplementedError("Keras is tracing shapes")
    if not all(isinstance(t, torch.Tensor)
               for t in tensors + list(state.values())):
        raise NotImplementedError("inputs are not torch tensors")
    query, key, value, log_forget_gate = tensors[:4]
    if query.dtype not in _DTYPES:
        raise NotImplementedError(
            f"dtype {query.dtype}: the kernels take float16, bfloat16 and "
            "float32")
    if log_forget_gate.shape[-1] > MAX_SLOTS:
        raise NotImplementedError(
            f"{log_forget_gate.shape[-1]} slots: the kernels take at most "
            f"{MAX_SLOTS}")
    if max(key.shape[-1], value.shape[-1]) > MAX_HEAD_DIM:
        raise NotImplementedError(
            f"head dims above {MAX_HEAD_DIM} are not supported")
    if any(v.requires_grad for v in state.values()):
        raise NotImplementedError(
            "the kernels give no gradient for the incoming state")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise NotImplementedError("triton is not installed") from None
    _check_device(tensors + list(state.values()))


def _tensors(call):
    names = ("query", "key", "value", "log_forget_gate", "window_query",
             "window_key", "padding_mask")
    return [call[n] for n in names if call.get(n) is not None]


def _load_sequence(call):
    _check(_tensors(call), call["state"])
    from keras_nha.kernels.triton.sequence import triton_nha
    return triton_nha if call["state"] is not None else _from_zero_state


# A fresh sequence's zero state per (shapes, dtype, device): building it
# took 8 torch.zeros per call (~0.1 ms of CPU at short lengths, where the
# GPU waits for the CPU). The kernels only read it, and the state they
# return never shares its tensors. Only small states are kept (a global
# layer's ring holds T tokens: ~1 GB at T=65536); larger ones are built per
# call, where the GPU's time dwarfs the CPU's anyway.
_ZERO_STATES = {}
_MAX_ZERO_STATES = 16
_MAX_CACHED_BYTES = 64 << 20


# Under torch.compile this is a graph break, as `triton_nha` is anyway.
@torch.compiler.disable  # the cache must hold real tensors, not traced ones
def _from_zero_state(*, query, key, value, log_forget_gate, window_size,
                     state, return_state=True, **call):
    """`triton_nha` from the (cached) zero state."""
    from keras_nha.kernels.triton.sequence import triton_nha

    assert state is None
    capacity = min(window_size, query.shape[1])
    signature = (query.shape[0], key.shape[2], key.shape[3], value.shape[3],
                 log_forget_gate.shape[-1], capacity, key.dtype, key.device)
    zeros = _ZERO_STATES.get(signature)
    if zeros is None:
        zeros = _zero_state(*signature)
        if sum(x.nbytes for x in zeros.values()) <= _MAX_CACHED_BYTES:
            if len(_ZERO_STATES) >= _MAX_ZERO_STATES:
                _ZERO_STATES.clear()
            _ZERO_STATES[signature] = zeros
    return triton_nha(query, key, value, log_forget_gate,
                      window_size=window_size, state=zeros,
                      return_state=return_state, **call)


def _zero_state(batch, kv_heads, key_dim, value_dim, num_slots, capacity,
                dtype, device):
    """`kernels.state.zero_state` on `device` (keras allocates on its own)."""
    from keras_nha.kernels import state as state_lib

    state = state_lib.zero_state(batch, kv_heads, key_dim, value_dim,
                                 num_slots, capacity, dtype)
    return {name: x.to(device) for name, x in state.items()}


# `backends._fast` hands this loader `state=None` for a fresh sequence.
_load_sequence.takes_fresh_state = True


def _load_step(call):
    _check(_tensors(call), call["state"])
    from keras_nha.kernels.triton.step import triton_nha_step
    return triton_nha_step


def fast_paths():
    return {"triton": _load_sequence}


def fast_step_paths():
    return {"triton": _load_step}


def is_concrete(x):
    if torch.compiler.is_compiling():
        return False
    return isinstance(x, torch.Tensor) and x.device.type != "meta"


def portable(kernel):
    """The portable kernels run eagerly, op by op, on torch."""
    return kernel
