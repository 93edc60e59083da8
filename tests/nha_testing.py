"""Shared test helpers: fresh random NHA inputs and backend-agnostic gradients."""

import keras
import numpy as np
from keras import ops

INPUT_NAMES = ("query", "key", "value", "log_forget_gate", "window_query",
               "window_key")


def random_inputs(seed, batch=2, length=37, heads=4, kv_heads=2, key_dim=16,
                  value_dim=16, num_slots=8, separate_window=True,
                  padding=False, gate_scale=1.0):
    """Fresh float64 NumPy inputs (never zeros); log gates <= 0."""
    rng = np.random.default_rng(seed)
    shape = (batch, length)
    inputs = {
        "query": rng.normal(size=shape + (heads, key_dim)),
        "key": rng.normal(size=shape + (kv_heads, key_dim)),
        "value": rng.normal(size=shape + (kv_heads, value_dim)),
        # log_sigmoid(f) / tau with tau = 1 .. 8-ish spreads gates widely.
        "log_forget_gate": -np.logaddexp(0.0, -rng.normal(
            size=shape + (kv_heads, num_slots)) * 2) * gate_scale,
    }
    if separate_window:
        inputs["window_query"] = rng.normal(size=shape + (heads, key_dim))
        inputs["window_key"] = rng.normal(size=shape + (kv_heads, key_dim))
    if padding:
        mask = (rng.random(shape) > 0.25).astype("float64")
        mask[:, -3:] = 0.0  # trailing padding too
        mask[:, 0] = 1.0
        inputs["padding_mask"] = mask
    return inputs


def cast_inputs(inputs, dtype):
    return {n: ops.convert_to_tensor(x, dtype if n != "padding_mask"
                                     else "float32")
            for n, x in inputs.items()}


def value_and_grads(fn, inputs, names, cotangent):
    """`fn(**inputs)` and d<fn, cotangent>/d inputs[name] for each name."""
    backend = keras.config.backend()
    cotangent = ops.convert_to_tensor(cotangent)
    if backend == "jax":
        import jax

        def loss(diff):
            out = fn(**{**inputs, **diff})
            return ops.sum(out * ops.cast(cotangent, out.dtype)), out

        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(
            {n: inputs[n] for n in names})
    elif backend == "tensorflow":
        import tensorflow as tf

        watched = {n: tf.Variable(inputs[n]) for n in names}
        with tf.GradientTape() as tape:
            out = fn(**{**inputs, **watched})
            loss = tf.reduce_sum(out * tf.cast(cotangent, out.dtype))
        grads = dict(zip(names, tape.gradient(loss, [watched[n]
                                                     for n in names])))
    else:
        import torch

        leaves = {n: inputs[n].detach().clone().requires_grad_(True)
                  for n in names}
        out = fn(**{**inputs, **leaves})
        loss = (out * cotangent.to(out.dtype)).sum()
        grads = dict(zip(names, torch.autograd.grad(
            loss, [leaves[n] for n in names])))
    return (ops.convert_to_numpy(out),
            {n: ops.convert_to_numpy(g) for n, g in grads.items()})


def relative_error(got, expected, mask=None):
    """max |got - expected| over max |expected| (masked rows ignored)."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected,
                                                            np.float64)
    if mask is not None:
        mask = np.asarray(mask).reshape(mask.shape + (1,) * (
            got.ndim - np.ndim(mask))) > 0
        got, expected = got * mask, expected * mask
    assert np.all(np.isfinite(got)), "non-finite values"
    return float(np.abs(got - expected).max() / max(np.abs(expected).max(),
                                                    1e-30))
