"""Decode-step timing and cache size of an `NHACausalLM` (for the LM study).

Generation keeps, per layer, a fixed-size NHA state (slot memory plus a ring
of the last W tokens; a global layer's ring holds the whole context). These
helpers measure one greedy decode step through `call_with_cache` with such a
cache, compiled the way each backend runs fastest, and count the cache's
bytes.
"""

import time

import keras
import numpy as np
from keras import ops


def compiled(function):
    """`function` compiled for the active backend (JAX jit, TF XLA)."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        return jax.jit(function)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function, jit_compile=True)
    return function


def _wait(token_ids):
    # The ids and the cache come out of one compiled call: reading the ids
    # waits for the whole step (JAX dispatches asynchronously).
    ops.convert_to_numpy(token_ids)


def cache_bytes(lm, context):
    """Bytes of one sequence's generation cache at `context` tokens.

    Args:
        lm: an `NHACausalLM`.
        context: the longest prompt + generation; sizes the rings of global
            layers (windows longer than this are cut to it).

    Returns:
        `(total_bytes, per_layer_bytes)`.
    """
    per_layer = []
    for entry in lm.get_initial_cache(1, max_length=context):
        per_layer.append(int(sum(
            np.prod(leaf.shape) * np.dtype(
                keras.backend.standardize_dtype(leaf.dtype)).itemsize
            for leaf in entry.values())))
    return sum(per_layer), per_layer


def essential_cache_bytes(lm, context):
    """Bytes a decoder must keep at least: per layer the float32 slot
    memory (unless no token ever leaves the window: `W >= context`) plus
    the window's rotated keys and values (a KV cache of `min(W, context)`
    tokens). The package's ring also keeps a mask, and in a layer with slots
    whose tokens leave the window, their raw keys and log gates (written
    into the slots when they leave).
    """
    total = 0
    for block in lm.backbone.transformer_layers:
        attention = block.attention
        heads, dim = attention.num_kv_heads, attention._head_dim
        itemsize = np.dtype(keras.backend.standardize_dtype(
            attention.compute_dtype)).itemsize
        window = min(attention.window_size, context)
        if attention.window_size < context:
            total += 2 * heads * dim * attention.num_slots * 4
        total += window * heads * 2 * dim * itemsize
    return total


def decode_ms_per_token(lm, context=2048, steps=100, warmup=5, repeats=3,
                        batch_size=1):
    """Milliseconds per greedily decoded token.

    The cache is sized for `context` tokens (what a global layer's ring
    must hold); a step's cost does not depend on how full the ring is, so
    the timing starts from an empty cache.

    Args:
        lm: an `NHACausalLM`.
        context: cache capacity in tokens (>= warmup + steps).
        steps: timed steps per repeat.
        warmup: untimed steps after the compiling one.
        repeats: timed runs of `steps`; the fastest counts (the least
            disturbed by other processes on a shared machine).
        batch_size: rows decoded together.

    Returns:
        `(ms_per_token, compile_seconds)`.
    """
    if warmup + repeats * steps + 1 > context:
        raise ValueError(f"`context`: expected > warmup + repeats * steps "
                         f"({warmup + repeats * steps}), got {context}.")

    def step(token_ids, cache):
        logits, _, cache = lm.call_with_cache(token_ids, cache)
        next_ids = ops.cast(ops.argmax(logits[:, -1], axis=-1), "int32")
        return next_ids[:, None], cache

    step = compiled(step)
    token_ids = ops.ones((batch_size, 1), "int32")
    cache = lm.get_initial_cache(batch_size, max_length=context)
    started = time.perf_counter()
    token_ids, cache = step(token_ids, cache)
    _wait(token_ids)
    compile_s = time.perf_counter() - started
    for _ in range(warmup):
        token_ids, cache = step(token_ids, cache)
    _wait(token_ids)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            token_ids, cache = step(token_ids, cache)
        _wait(token_ids)
        best = min(best, (time.perf_counter() - started) / steps)
    return 1000 * best, compile_s
