"""The NHA attention block as a Keras layer."""

import keras
from keras import ops

from keras_nha import ops as nha_ops
from keras_nha import validation
from keras_nha.layers.arguments import check_int
from keras_nha.layers.arguments import copy_initializer
from keras_nha.layers.arguments import default_initializer
from keras_nha.layers.cache_layer import CacheLayer
from keras_nha.layers.rotary import apply_rotary

_HALF = ("bfloat16", "float16")


@keras.saving.register_keras_serializable(package="keras_nha")
class NHALayer(CacheLayer):
    """Native Hybrid Attention: gated slot memory + sliding window, one softmax.

    `q = x Wq`, `k = x Wk`, `v = act(x Wv)`, `g = log_sigmoid(x Wf) / tau`;
    rotary embedding on the window path's q and k; NHA over them; then
    `act(o)` -> RMSNorm -> `Wo`. `window_size` can be changed after training
    without new weights.

    Args:
        num_heads: query heads H.
        head_dim: key/query/value dim per head; default `hidden_dim // H`.
        num_kv_heads: key/value heads (grouped-query); default H.
        num_slots: slot count M (0 = sliding window / full attention only).
        window_size: W, Python int (0 = GSA; >= any length = global).
        gate_logit_normalizer: tau in `g = log_sigmoid(f) / tau`.
        feature_map: None or "swish", applied to slot-path q and k.
        value_activation: activation on v ("silu"; None for hybrids).
        output_activation: activation on the attention output ("silu").
        use_output_norm: RMSNorm over the concatenated heads before `Wo`.
        use_bias: biases on the q/k/v projections (e.g. Qwen).
        use_rotary: rotary embedding on the window path.
        rope_max_wavelength: rotary base.
        rope_scaling_factor: linear rotary position scaling.
        scale: logit scale, default `head_dim ** -0.5`.
        norm_epsilon: RMSNorm epsilon.
        kernel_initializer: projections' initializer, normal(0, 0.02).
        implementation: forwarded to `keras_nha.ops.native_hybrid_attention`.
        chunk_size: block length of the portable "chunked" path (None: its
            default); see `keras_nha.ops.native_hybrid_attention`.
        **kwargs: `keras.layers.Layer` arguments (name, dtype, ...).

    Example:

    >>> layer = keras_nha.NHALayer(num_heads=4, num_slots=16, window_size=32)
    >>> layer(keras.random.normal((2, 100, 64))).shape
    (2, 100, 64)
    """

    def __init__(self, num_heads, head_dim=None, num_kv_heads=None,
                 num_slots=64, window_size=64, gate_logit_normalizer=8.0,
                 feature_map=None, value_activation="silu",
                 output_activation="silu", use_output_norm=True,
                 use_bias=False, use_rotary=True, rope_max_wavelength=10000,
                 rope_scaling_factor=1.0, scale=None, norm_epsilon=1e-6,
                 kernel_initializer=None, implementation="auto",
                 chunk_size=None, **kwargs):
        super().__init__(**kwargs)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value, low in (("num_heads", num_heads, 1),
                                 ("num_kv_heads", num_kv_heads, 1),
                                 ("num_slots", num_slots, 0),
                                 ("window_size", window_size, 0)):
            check_int(name, value, low)
        if chunk_size is not None:
            check_int("chunk_size", chunk_size, 1)
        if head_dim is not None:
            check_int("head_dim", head_dim, 1)
            if use_rotary and head_dim % 2:
                raise ValueError(f"`head_dim`: rotary embedding needs an even "
                                 f"head_dim, got {head_dim}; pass "
                                 "use_rotary=False or an even head_dim.")
        validation.check_implementation(implementation)
        if scale is not None:
            validation.check_scale(scale, head_dim or 1)
        for name, activation in (("value_activation", value_activation),
                                 ("output_activation", output_activation)):
            if activation is not None:
                try:
                    keras.activations.get(activation)
                except ValueError:
                    raise ValueError(f"`{name}`: expected None or a Keras "
                                     f"activation, got {activation!r}."
                                     ) from None
        if num_heads % num_kv_heads:
            raise ValueError(f"`num_heads`: expected a multiple of num_kv_heads"
                             f"={num_kv_heads}, got {num_heads}.")
        if num_slots == 0 and window_size == 0:
            raise ValueError("`window_size`: expected > 0 when num_slots is 0.")
        if feature_map not in (None, "swish"):
            raise ValueError(f"`feature_map`: expected None or 'swish', got "
                             f"{feature_map!r}.")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.num_slots = num_slots
        self.window_size = window_size
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        self.feature_map = feature_map
        self.value_activation = value_activation
        self.output_activation = output_activation
        self.use_output_norm = use_output_norm
        self.use_bias = use_bias
        self.use_rotary = use_rotary
        self.rope_max_wavelength = rope_max_wavelength
        self.rope_scaling_factor = rope_scaling_factor
        self.scale = scale
        self.norm_epsilon = norm_epsilon
        self.kernel_initializer = default_initializer(kernel_initializer)
        self.implementation = implementation
        self.chunk_size = chunk_size

    def _dense(self, name, equation, output_shape, bias_axes=None, dtype=None):
        return keras.layers.EinsumDense(
            equation, output_shape, bias_axes=bias_axes,
            kernel_initializer=copy_initializer(self.kernel_initializer),
            dtype=dtype or self.dtype_policy, name=name)

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        head_dim = self.head_dim
        if head_dim is None:
            if hidden_dim is None or hidden_dim % self.num_heads:
                raise ValueError(
                    f"`num_heads`: the hidden dim {hidden_dim} is not a "
                    f"multiple of num_heads={self.num_heads}; pass head_dim.")
            head_dim = hidden_dim // self.num_heads
            if self.use_rotary and head_dim % 2:
                raise ValueError(
                    f"`num_heads`: hidden dim {hidden_dim} / num_heads "
                    f"{self.num_heads} gives an odd head_dim {head_dim}, and "
                    "rotary embedding needs an even one; pass head_dim.")
        self._head_dim = head_dim
        bias = "hd" if self.use_bias else None
        self.query_dense = self._dense(
            "query", "btm,mhd->bthd", (None, self.num_heads, head_dim), bias)
        self.key_dense = self._dense(
            "key", "btm,mhd->bthd", (None, self.num_kv_heads, head_dim), bias)
        self.value_dense = self._dense(
            "value", "btm,mhd->bthd", (None, self.num_kv_heads, head_dim), bias)
        half = self.dtype_policy.compute_dtype in _HALF
        self.gate_dense = (self._dense(
            "gate", "btm,mhs->bths", (None, self.num_kv_heads, self.num_slots),
            dtype="float32" if half else None) if self.num_slots else None)
        self.output_norm = (keras.layers.RMSNormalization(
            epsilon=self.norm_epsilon, dtype=self.dtype_policy,
            name="output_norm") if self.use_output_norm else None)
        self.output_dense = self._dense(
            "output", "bthd,hdm->btm", (None, hidden_dim))
        for layer in (self.query_dense, self.key_dense, self.value_dense,
                      self.gate_dense):
            if layer is not None:
                layer.build(input_shape)
        if self.output_norm is not None:
            self.output_norm.build((None, None, self.num_heads * head_dim))
        self.output_dense.build((None, None, self.num_heads, head_dim))
        self.built = True

    def _log_gates(self, x):
        if not self.num_slots:
            shape = ops.shape(x)[:2] + (self.num_kv_heads, 0)
            return ops.zeros(shape, "float32")
        logits = self.gate_dense(ops.cast(x, self.gate_dense.compute_dtype))
        return (ops.log_sigmoid(ops.cast(logits, "float32"))
                / self.gate_logit_normalizer)

    def _project(self, x, start):
        query, key = self.query_dense(x), self.key_dense(x)
        value = self.value_dense(x)
        if self.value_activation:
            value = keras.activations.get(self.value_activation)(value)
        window_query, window_key = query, key
        if self.use_rotary:
            positions = start + ops.arange(ops.shape(x)[1], dtype="int32")
            rotate = lambda t: apply_rotary(t, positions,
                                            self.rope_max_wavelength,
                                            self.rope_scaling_factor)
            window_query, window_key = rotate(query), rotate(key)
        if self.feature_map == "swish":
            query, key = ops.silu(query), ops.silu(key)
        return dict(query=query, key=key, value=value,
                    log_forget_gate=self._log_gates(x),
                    window_query=window_query, window_key=window_key)

    def _finish(self, attended):
        if self.output_activation:
            attended = keras.activations.get(self.output_activation)(attended)
        if self.output_norm is not None:
            shape = ops.shape(attended)
            flat = ops.reshape(attended, shape[:2] + (-1,))
            attended = ops.reshape(self.output_norm(flat), shape)
        return self.output_dense(attended)

    def get_initial_cache(self, batch_size, max_length=None):
        """An empty decode cache (the NHA state) for this layer.

        Args:
            batch_size: rows to decode.
            max_length: longest prompt + generation; bounds the ring of a
                global layer (`window_size` >= any length).

        Returns:
            The state dict of `keras_nha.ops.initial_state`.
        """
        head_dim = self.head_dim or getattr(self, "_head_dim", None)
        if head_dim is None:
            raise ValueError(
                "get_initial_cache() needs the head dim: build the layer "
                "(call it once) or pass head_dim to NHALayer.")
        return nha_ops.initial_state(
            batch_size, self.num_kv_heads, head_dim, head_dim,
            self.num_slots, self.window_size, max_length=max_length,
            dtype=self.compute_dtype)

    def call(self, inputs, padding_mask=None, cache=None):
        """Runs the layer.

        Args:
            inputs: `[B, T, D]`.
            padding_mask: optional `[B, T]`, 1 for real tokens.
            cache: optional state from `get_initial_cache()` or an earlier
                call; when given, the layer continues from it and returns
                `(output, new_cache)`. The layer never stores a cache.

        Returns:
            `[B, T, D]`, or `(output, new_cache)` when `cache` is given.
        """
        start = 0 if cache is None else cache["position"]
        projected = self._project(inputs, start)
        kwargs = dict(scale=self.scale, padding_mask=padding_mask,
                      implementation=self.implementation)
        if cache is None:
            attended = nha_ops.native_hybrid_attention(
                window_size=self.window_size, chunk_size=self.chunk_size,
                **projected, **kwargs)
            return self._finish(attended)
        if inputs.shape[1] == 1:
            token = {n: t[:, 0] for n, t in projected.items()}
            if padding_mask is not None:
                kwargs["padding_mask"] = padding_mask[:, 0]
            attended, cache = nha_ops.native_hybrid_attention_step(
                state=cache, window_size=self.window_size, **token, **kwargs)
            attended = attended[:, None]
        else:
            attended, cache = nha_ops.native_hybrid_attention(
                window_size=self.window_size, chunk_size=self.chunk_size,
                initial_state=cache,
                return_state=True, **projected, **kwargs)
        return self._finish(attended), cache

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads, head_dim=self.head_dim,
            num_kv_heads=self.num_kv_heads, num_slots=self.num_slots,
            window_size=self.window_size,
            gate_logit_normalizer=self.gate_logit_normalizer,
            feature_map=self.feature_map,
            value_activation=self.value_activation,
            output_activation=self.output_activation,
            use_output_norm=self.use_output_norm, use_bias=self.use_bias,
            use_rotary=self.use_rotary,
            rope_max_wavelength=self.rope_max_wavelength,
            rope_scaling_factor=self.rope_scaling_factor, scale=self.scale,
            norm_epsilon=self.norm_epsilon,
            kernel_initializer=keras.initializers.serialize(
                self.kernel_initializer),
            implementation=self.implementation, chunk_size=self.chunk_size)
        return config
