"""Rotary position embedding in keras-hub's convention (halves rotated)."""

from keras import ops


def apply_rotary(x, positions, max_wavelength=10000, scaling_factor=1.0):
    """Rotates `x` `[B, T, H, D]` by absolute `positions` `[T]`.

    Matches `keras_hub.layers.RotaryEmbedding` (no frequency adjustment), so
    hybridized keras-hub models keep their exact window logits.
    """
    dim = x.shape[-1]
    exponents = ops.arange(0, dim, 2, dtype="float32") / dim
    inverse_frequency = 1.0 / (max_wavelength ** exponents)
    angles = ops.einsum("t,f->tf", ops.cast(positions, "float32") / scaling_factor,
                        inverse_frequency)
    angles = ops.concatenate([angles, angles], axis=-1)[None, :, None, :]
    cos = ops.cast(ops.cos(angles), x.dtype)
    sin = ops.cast(ops.sin(angles), x.dtype)
    first, second = ops.split(x, 2, axis=-1)
    rotated_half = ops.concatenate([-second, first], axis=-1)
    return x * cos + rotated_half * sin
