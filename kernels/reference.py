"""The reference NHA: the one-token step applied T times.

Ground truth and slow: a Python loop of T steps (unrolled when traced), kept
that way because it is the easiest code to check against the spec.
Differentiable by each backend's autodiff.
"""

from keras import ops

from keras_nha.kernels import state as state_lib
from keras_nha.kernels.step import nha_step


def reference_nha(query, key, value, log_forget_gate, *, window_size, scale,
                  window_query, window_key, padding_mask, state=None):
    """Inputs `[B, T, ...]` and a state (None: a fresh sequence); returns
    `(output [B, T, H, V], state)`."""
    if state is None:
        state = state_lib.fresh_state(query, key, value, log_forget_gate,
                                      window_size)
    outputs = []
    for t in range(query.shape[1]):
        output, state = nha_step(
            query[:, t], key[:, t], value[:, t], log_forget_gate[:, t], state,
            window_size=window_size, scale=scale,
            window_query=window_query[:, t], window_key=window_key[:, t],
            padding_mask=None if padding_mask is None else padding_mask[:, t])
        outputs.append(output)
    return ops.stack(outputs, axis=1), state
