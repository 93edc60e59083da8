"""One pre-norm decoder block: RMSNorm -> NHA -> residual -> RMSNorm -> GLU."""

import keras
from keras import ops

from keras_nha.layers.arguments import copy_initializer
from keras_nha.layers.arguments import default_initializer
from keras_nha.layers.cache_layer import CacheLayer
from keras_nha.layers.nha_layer import NHALayer

# Arguments that `NHABackbone` gives every block unchanged (and keeps in its
# own config under the same names).
SHARED_BLOCK_ARGUMENTS = (
    "head_dim", "gate_logit_normalizer", "feature_map", "value_activation",
    "attention_output_activation", "use_attention_output_norm",
    "use_qkv_bias", "attention_scale", "rope_max_wavelength",
    "rope_scaling_factor", "feedforward_activation", "layer_norm_epsilon",
    "dropout", "implementation", "chunk_size")

_ACTIVATIONS = {
    "silu": ops.silu,
    "gelu": lambda x: ops.gelu(x, approximate=False),
    "gelu_approximate": lambda x: ops.gelu(x, approximate=True),
}


@keras.saving.register_keras_serializable(package="keras_nha")
class NHADecoderBlock(CacheLayer):
    """A decoder block of `NHABackbone`.

    `x + attention(norm(x))`, then `x + down(act(gate(norm(x))) * up(norm(x)))`.
    The attention is a `keras_nha.layers.NHALayer`; every other weight has the
    layout of keras-hub's Llama block, so pretrained keras-hub blocks can be
    copied in (see `keras_nha.models.hybridize`).

    Args:
        num_query_heads: query heads H.
        num_key_value_heads: key/value heads (grouped-query).
        intermediate_dim: hidden size of the gated feedforward network.
        window_size: exact-attention window W (Python int; 0 = slots only).
        num_slots: slot count M.
        head_dim: dim per head; default `hidden_dim // num_query_heads`.
        gate_logit_normalizer: tau of the slot forget gates.
        feature_map: None or "swish", on the slot-path queries and keys.
        value_activation: activation on the values (None for hybrids).
        attention_output_activation: activation on the attention output.
        use_attention_output_norm: RMSNorm over the heads before the output
            projection.
        use_qkv_bias: biases on the query, key and value projections.
        attention_scale: logit scale, default `head_dim ** -0.5`.
        rope_max_wavelength: rotary base.
        rope_scaling_factor: linear rotary position scaling.
        feedforward_activation: activation of the feedforward gate: "silu"
            (SwiGLU), "gelu" or "gelu_approximate" (GeGLU, as in Gemma).
        layer_norm_epsilon: epsilon of the RMS norms.
        dropout: dropout rate after attention and feedforward.
        kernel_initializer: initializer of every projection.
        implementation: NHA kernel choice, see `keras_nha.ops`.
        chunk_size: block length of the portable "chunked" path.
        **kwargs: `keras.layers.Layer` arguments.

    Example:

    >>> block = NHADecoderBlock(4, 2, intermediate_dim=128, window_size=16,
    ...                         num_slots=8)
    >>> block(keras.random.normal((2, 40, 64))).shape
    (2, 40, 64)
    """

    def __init__(self, num_query_heads, num_key_value_heads, intermediate_dim,
                 window_size, num_slots, head_dim=None,
                 gate_logit_normalizer=8.0, feature_map=None,
                 value_activation="silu", attention_output_activation="silu",
                 use_attention_output_norm=True, use_qkv_bias=False,
                 attention_scale=None, rope_max_wavelength=10000,
                 rope_scaling_factor=1.0, feedforward_activation="silu",
                 layer_norm_epsilon=1e-6, dropout=0.0,
                 kernel_initializer=None, implementation="auto",
                 chunk_size=None, **kwargs):
        super().__init__(**kwargs)
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_dim = intermediate_dim
        self.window_size = window_size
        self.num_slots = num_slots
        self.head_dim = head_dim
        self.gate_logit_normalizer = gate_logit_normalizer
        self.feature_map = feature_map
        self.value_activation = value_activation
        self.attention_output_activation = attention_output_activation
        self.use_attention_output_norm = use_attention_output_norm
        self.use_qkv_bias = use_qkv_bias
        self.attention_scale = attention_scale
        self.rope_max_wavelength = rope_max_wavelength
        self.rope_scaling_factor = rope_scaling_factor
        self.feedforward_activation = feedforward_activation
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout
        self.kernel_initializer = default_initializer(kernel_initializer)
        self.implementation = implementation
        self.chunk_size = chunk_size
        if feedforward_activation not in _ACTIVATIONS:
            raise ValueError(
                f"`feedforward_activation`: expected one of "
                f"{sorted(_ACTIVATIONS)}, got {feedforward_activation!r}.")
        self._activation = _ACTIVATIONS[feedforward_activation]

        self.attention_norm = self._norm("attention_norm")
        self.attention = NHALayer(
            num_heads=num_query_heads, head_dim=head_dim,
            num_kv_heads=num_key_value_heads, num_slots=num_slots,
            window_size=window_size,
            gate_logit_normalizer=gate_logit_normalizer,
            feature_map=feature_map, value_activation=value_activation,
            output_activation=attention_output_activation,
            use_output_norm=use_attention_output_norm, use_bias=use_qkv_bias,
            rope_max_wavelength=rope_max_wavelength,
            rope_scaling_factor=rope_scaling_factor, scale=attention_scale,
            norm_epsilon=layer_norm_epsilon,
            kernel_initializer=copy_initializer(self.kernel_initializer),
            implementation=implementation, chunk_size=chunk_size,
            dtype=self.dtype_policy, name="attention")
        self.feedforward_norm = self._norm("feedforward_norm")
        self.feedforward_gate_dense = self._dense(intermediate_dim,
                                                  "feedforward_gate_dense")
        self.feedforward_intermediate_dense = self._dense(
            intermediate_dim, "feedforward_intermediate_dense")
        self.feedforward_output_dense = None  # needs hidden_dim: built later
        self.dropout_layer = keras.layers.Dropout(dropout,
                                                  dtype=self.dtype_policy)

    def _norm(self, name):
        return keras.layers.RMSNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name=name)

    def _dense(self, units, name):
        return keras.layers.Dense(units, use_bias=False,
                                  kernel_initializer=copy_initializer(
                                      self.kernel_initializer),
                                  dtype=self.dtype_policy, name=name)

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        self.feedforward_output_dense = self._dense(hidden_dim,
                                                    "feedforward_output_dense")
        self.attention_norm.build(input_shape)
        self.attention.build(input_shape)
        self.feedforward_norm.build(input_shape)
        self.feedforward_gate_dense.build(input_shape)
        self.feedforward_intermediate_dense.build(input_shape)
        self.feedforward_output_dense.build(
            tuple(input_shape[:-1]) + (self.intermediate_dim,))
        self.built = True

    def get_initial_cache(self, batch_size, max_length=None):
        """The empty NHA state of this block's attention layer."""
        return self.attention.get_initial_cache(batch_size, max_length)

    def call(self, inputs, padding_mask=None, cache=None, training=None):
        """Runs the block.

        Args:
            inputs: `[B, T, D]`.
            padding_mask: optional `[B, T]`, 1 for real tokens.
            cache: optional NHA state; when given, returns `(x, new_cache)`.
            training: Python bool for dropout.

        Returns:
            `[B, T, D]`, or `(output, new_cache)` when `cache` is given.
        """
        attended = self.attention(self.attention_norm(inputs),
                                  padding_mask=padding_mask, cache=cache)
        if cache is not None:
            attended, cache = attended
        x = inputs + self.dropout_layer(attended, training=training)
        normed = self.feedforward_norm(x)
        gate = self._activation(ops.cast(self.feedforward_gate_dense(normed),
                                         "float32"))
        hidden = self.feedforward_intermediate_dense(normed) * ops.cast(
            gate, self.compute_dtype)
        x = x + self.dropout_layer(self.feedforward_output_dense(hidden),
                                   training=training)
        return x if cache is None else (x, cache)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_query_heads=self.num_query_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_dim=self.intermediate_dim,
            window_size=self.window_size, num_slots=self.num_slots,
            kernel_initializer=keras.initializers.serialize(
                self.kernel_initializer),
            **{name: getattr(self, name) for name in SHARED_BLOCK_ARGUMENTS})
        return config
