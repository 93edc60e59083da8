"""Argument checks for `keras_nha.ops`: clear errors before any math runs."""

from keras import ops

from keras_nha.backends import IMPLEMENTATIONS
from keras_nha.backends import is_concrete
from keras_nha.kernels.state import STATE_NAMES


def _fail(argument, got, expected):
    raise ValueError(f"`{argument}`: expected {expected}, got {got}.")


def _shape(x, argument, rank):
    if x is None or not hasattr(x, "shape"):
        _fail(argument, type(x).__name__, "a tensor")
    shape = tuple(x.shape)
    if len(shape) != rank:
        _fail(argument, f"shape {shape}", f"a rank-{rank} tensor")
    if not _is_float(x):
        _fail(argument, f"dtype {x.dtype}", "a floating-point tensor")
    return shape


def _is_float(x):
    return "float" in str(getattr(x, "dtype", ""))


def _same(argument, got, expected, what):
    for g, e in zip(got, expected):
        if g is not None and e is not None and g != e:
            _fail(argument, f"shape {tuple(got)}",
                  f"shape {tuple(expected)} ({what})")


def check_window_size(window_size):
    if (isinstance(window_size, bool) or not isinstance(window_size, int)
            or window_size < 0):
        if hasattr(window_size, "shape"):
            got = "a tensor"
        else:
            got = repr(window_size)
        _fail("window_size", got, "a Python int >= 0 (it sets static shapes)")
    return window_size


def check_implementation(implementation):
    if implementation not in IMPLEMENTATIONS:
        _fail("implementation", repr(implementation),
              f"one of {IMPLEMENTATIONS}")


def check_chunk_size(chunk_size):
    if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
            or chunk_size < 1):
        _fail("chunk_size", repr(chunk_size), "None or a Python int >= 1")


def check_scale(scale, key_dim):
    if scale is None:
        return float(key_dim) ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or (
            scale <= 0):
        _fail("scale", repr(scale), "a positive Python float")
    return float(scale)


def _on_host(x):
    try:
        device = str(getattr(x.device, "type", x.device)).lower()
    except Exception:  # sharded arrays have no single device
        return False
    return "cuda" not in device and "gpu" not in device


def check_gates_nonpositive(log_forget_gate):
    """Positive log gates are the caller's bug; checked only when it is free:
    eager values on the CPU (on an accelerator the check would sync, so
    GPU and TPU inputs are not checked)."""
    if (0 in tuple(log_forget_gate.shape) or not is_concrete(log_forget_gate)
            or not _on_host(log_forget_gate)):
        return
    # A concrete array closed over inside a trace still reduces to a tracer.
    largest = ops.max(log_forget_gate)
    if is_concrete(largest) and float(ops.convert_to_numpy(
            ops.cast(largest, "float32"))) > 0:
        _fail("log_forget_gate", "positive entries",
              "log(alpha) <= 0 everywhere (e.g. log_sigmoid(x) / tau)")


def check_inputs(query, key, value, log_forget_gate, window_size,
                 window_query, window_key, padding_mask, time_axis=True):
    """Checks shapes; returns (B, T, H, Hkv, K, V, M) (T is 1 for a step)."""
    rank = 4 if time_axis else 3
    q = _shape(query, "query", rank)
    k = _shape(key, "key", rank)
    v = _shape(value, "value", rank)
    g = _shape(log_forget_gate, "log_forget_gate", rank)
    lead = q[:-2]
    heads, kv_heads = q[-2], k[-2]
    _same("key", k[:-2], lead, "batch and time of `query`")
    _same("value", v[:-1], k[:-1], "batch, time and heads of `key`")
    _same("log_forget_gate", g[:-1], k[:-1], "batch, time and heads of `key`")
    if k[-1] is not None and q[-1] is not None and k[-1] != q[-1]:
        _fail("key", f"key dim {k[-1]}", f"the query's key dim {q[-1]}")
    if heads % kv_heads:
        _fail("query", f"{heads} heads",
              f"a multiple of the key's {kv_heads} heads (grouped-query)")
    if window_query is not None:
        _same("window_query", _shape(window_query, "window_query", rank), q,
              "same as `query`")
    if window_key is not None:
        _same("window_key", _shape(window_key, "window_key", rank), k,
              "same as `key`")
    if padding_mask is not None:
        mask_shape = tuple(getattr(padding_mask, "shape", ()))
        if len(mask_shape) != len(lead):
            _fail("padding_mask", f"shape {mask_shape}",
                  f"shape {lead} (batch{', time' if time_axis else ''})")
        _same("padding_mask", mask_shape, lead, "batch and time of `query`")
    num_slots = g[-1]
    check_window_size(window_size)
    if num_slots == 0 and window_size == 0:
        _fail("window_size", 0, "> 0 when there are no slots (M = 0): "
              "otherwise nothing is attended")
    time = q[1] if time_axis else 1
    if time == 0:
        _fail("query", "an empty sequence (T = 0)",
              "at least one token; skip the call for an empty chunk")
    return q[0], time, heads, kv_heads, q[-1], v[-1], num_slots


def check_state(state, batch, kv_heads, key_dim, value_dim, num_slots,
                window_size, time):
    """Checks a state against the call's configuration."""
    if not isinstance(state, dict) or set(state) != set(STATE_NAMES):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        _fail("initial_state", got,
              f"a state dict with keys {sorted(STATE_NAMES)} "
              "(from keras_nha.ops.initial_state or return_state=True)")
    capacity = state["keys"].shape[1]
    expected = {
        "slot_keys": (batch, kv_heads, key_dim, num_slots),
        "slot_values": (batch, kv_heads, num_slots, value_dim),
        "keys": (batch, capacity, kv_heads, key_dim),
        "window_keys": (batch, capacity, kv_heads, key_dim),
        "values": (batch, capacity, kv_heads, value_dim),
        "log_forget_gates": (batch, capacity, kv_heads, num_slots),
        "mask": (batch, capacity),
        "position": (),
    }
    for name, shape in expected.items():
        got = tuple(state[name].shape)
        if len(got) != len(shape):
            _fail(f"initial_state['{name}']", f"shape {got}",
                  f"shape {shape} (a state from another configuration?)")
        _same(f"initial_state['{name}']", got, shape,
              "a state from another configuration?")
    if capacity > window_size or (window_size > 0) != (capacity > 0):
        _fail("initial_state", f"a ring of {capacity} window tokens",
              f"at most window_size={window_size} and none only when "
              "window_size is 0 (a state from another configuration?)")
    if capacity < window_size and is_concrete(state["position"]):
        end = int(ops.convert_to_numpy(state["position"])) + time
        if end > capacity:
            _fail("initial_state",
                  f"a ring of {capacity} tokens while the sequence reaches "
                  f"{end} tokens", f"a ring of min(window_size, total length) "
                  "tokens; build the state with a larger `max_length`")
