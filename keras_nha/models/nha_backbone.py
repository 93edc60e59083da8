"""A decoder-only stack of NHA blocks in keras-hub's Backbone conventions."""

import keras
from keras_hub.layers import ReversibleEmbedding
from keras_hub.models import Backbone

from keras_nha.layers.arguments import check_int
from keras_nha.models.nha_decoder_block import SHARED_BLOCK_ARGUMENTS
from keras_nha.models.nha_decoder_block import NHADecoderBlock
from keras_nha.models.nha_presets import explained_preset_loading

# A window this long is never reached: the layer is full causal attention.
GLOBAL_WINDOW = 1 << 30


def _per_layer(value, num_layers, name, allow_none):
    values = list(value) if isinstance(value, (list, tuple)) else (
        [value] * num_layers)
    if len(values) != num_layers:
        raise ValueError(f"`{name}`: expected one entry per layer "
                         f"({num_layers}), got {len(values)}: {value!r}.")
    for v in values:
        if v is None and allow_none:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            expected = "a Python int >= 0" + (" or None (global)"
                                               if allow_none else "")
            raise ValueError(f"`{name}`: expected {expected} or a list of "
                             f"them, got {value!r}.")
    return values


def _check_splits(sizes):
    """Raises a ValueError naming the argument whose size the current
    `ModelParallel` layout cannot split evenly (JAX's own error would only
    name an array axis).

    Args:
        sizes: `(argument name, value, weight path, weight axis)` tuples.
    """
    distribution = keras.distribution.distribution()
    if not isinstance(distribution, keras.distribution.ModelParallel):
        return
    mesh = distribution.device_mesh
    mesh_sizes = dict(zip(mesh.axis_names, mesh.shape))
    for name, value, path, axis in sizes:
        layout = distribution.get_tensor_layout(path)
        mesh_axis = layout.axes[axis] if layout is not None else None
        if mesh_axis is None or not isinstance(mesh_axis, str):
            continue
        if value % mesh_sizes[mesh_axis]:
            raise ValueError(
                f"`{name}`: {value} does not split evenly over the "
                f"{mesh_sizes[mesh_axis]} devices of mesh axis "
                f"{mesh_axis!r}, which the layout map shards it on; use a "
                f"multiple of {mesh_sizes[mesh_axis]}.")


@keras.saving.register_keras_serializable(package="keras_nha")
@explained_preset_loading
class NHABackbone(Backbone):
    """A decoder-only language model backbone built from NHA blocks.

    Token embedding (optionally scaled), then `num_layers` pre-norm blocks
    `x + NHA(RMSNorm(x))`, `x + GLU(RMSNorm(x))`, then a final RMSNorm. The
    output is the final hidden states `[B, T, hidden_dim]`; `NHACausalLM`
    adds the (tied or untied) output projection.

    `window_size` is the inter-layer hybrid knob: an int for every layer or a
    per-layer list, where `None` makes a layer global (full causal attention)
    and `0` makes it purely recurrent (gated slot attention). Windows are not
    weights: `NHABackbone.from_config({**backbone.get_config(),
    "window_size": other})` followed by `set_weights(backbone.get_weights())`
    gives the same model with other windows (the paper's inference-time
    search over window schedules).

    Args:
        vocabulary_size: number of token ids.
        num_layers: number of decoder blocks.
        num_query_heads: query heads per block.
        hidden_dim: model width.
        intermediate_dim: feedforward width.
        num_key_value_heads: key/value heads (grouped-query); default
            `num_query_heads`.
        head_dim: dim per head; default `hidden_dim // num_query_heads`.
        window_size: int, None (global) or a per-layer list of them.
        num_slots: slot count M, an int or a per-layer list (0 = none).
        gate_logit_normalizer: tau of the slot forget gates.
        feature_map: None or "swish", on the slot-path queries and keys.
        value_activation: activation on values ("silu"; None for hybrids).
        attention_output_activation: activation on the attention output.
        use_attention_output_norm: RMSNorm over the heads before the
            attention output projection.
        use_qkv_bias: biases on the query, key and value projections.
        attention_scale: logit scale, default `head_dim ** -0.5`.
        rope_max_wavelength: rotary base of the window path.
        rope_scaling_factor: linear rotary position scaling.
        feedforward_activation: "silu" (SwiGLU), "gelu" or
            "gelu_approximate" (GeGLU).
        embedding_scale: multiplies the token embeddings (Gemma uses
            `sqrt(hidden_dim)`); None for no scaling.
        layer_norm_epsilon: epsilon of the RMS norms.
        dropout: dropout rate inside the blocks.
        tie_word_embeddings: reuse the token embedding as output projection.
        implementation: NHA kernel choice, see `keras_nha.ops`.
        chunk_size: block length of the portable "chunked" path (None: its
            default; 8-16 is faster for small models).
        dtype: dtype policy of the whole model.
        **kwargs: `keras_hub.models.Backbone` arguments (name, ...).

    Returns:
        A functional model mapping `{"token_ids", "padding_mask"}` to hidden
        states `[B, T, hidden_dim]`.

    Example:

    >>> backbone = keras_nha.models.NHABackbone(
    ...     vocabulary_size=259, num_layers=2, num_query_heads=4,
    ...     hidden_dim=64, intermediate_dim=128, window_size=[16, None],
    ...     num_slots=8)
    >>> backbone({"token_ids": np.ones((1, 12), "int32"),
    ...           "padding_mask": np.ones((1, 12), "int32")}).shape
    (1, 12, 64)
    """

    def __init__(self, vocabulary_size, num_layers, num_query_heads,
                 hidden_dim, intermediate_dim, num_key_value_heads=None,
                 head_dim=None, window_size=64, num_slots=64,
                 gate_logit_normalizer=8.0, feature_map=None,
                 value_activation="silu", attention_output_activation="silu",
                 use_attention_output_norm=True, use_qkv_bias=False,
                 attention_scale=None, rope_max_wavelength=10000,
                 rope_scaling_factor=1.0, feedforward_activation="silu",
                 embedding_scale=None, layer_norm_epsilon=1e-6, dropout=0.0,
                 tie_word_embeddings=True, implementation="auto",
                 chunk_size=None, dtype=None, **kwargs):
        for name, value in (("vocabulary_size", vocabulary_size),
                            ("num_layers", num_layers),
                            ("num_query_heads", num_query_heads),
                            ("hidden_dim", hidden_dim),
                            ("intermediate_dim", intermediate_dim)):
            check_int(name, value, 1)
        kv_heads = num_key_value_heads or num_query_heads
        check_int("num_key_value_heads", kv_heads, 1)
        if num_query_heads % kv_heads:
            raise ValueError(
                f"`num_query_heads`: expected a multiple of "
                f"num_key_value_heads={kv_heads}, got {num_query_heads}.")
        if head_dim is None and hidden_dim % num_query_heads:
            raise ValueError(
                f"`hidden_dim`: {hidden_dim} is not a multiple of "
                f"num_query_heads={num_query_heads}; pass head_dim.")
        windows = _per_layer(window_size, num_layers, "window_size", True)
        slots = _per_layer(num_slots, num_layers, "num_slots", False)
        attention = "transformer_layer_0/attention/"
        _check_splits((
            ("vocabulary_size", vocabulary_size, "token_embedding/embeddings",
             0),
            ("num_query_heads", num_query_heads, attention + "query/kernel",
             1),
            ("num_key_value_heads", kv_heads, attention + "key/kernel", 1),
            ("intermediate_dim", intermediate_dim,
             "transformer_layer_0/feedforward_gate_dense/kernel", 1)))
        # The arguments every block takes unchanged, by their names here.
        arguments = locals()
        shared = {name: arguments[name] for name in SHARED_BLOCK_ARGUMENTS}

        # === Layers ===
        self.token_embedding = ReversibleEmbedding(
            input_dim=vocabulary_size, output_dim=hidden_dim,
            tie_weights=tie_word_embeddings,
            embeddings_initializer=keras.initializers.RandomNormal(
                stddev=0.02),
            dtype=dtype, name="token_embedding")
        self.transformer_layers = []
        for i, (window, slot_count) in enumerate(zip(windows, slots)):
            self.transformer_layers.append(NHADecoderBlock(
                num_query_heads=num_query_heads,
                num_key_value_heads=kv_heads,
                intermediate_dim=intermediate_dim,
                window_size=GLOBAL_WINDOW if window is None else window,
                num_slots=slot_count, dtype=dtype,
                name=f"transformer_layer_{i}", **shared))
        self.layer_norm = keras.layers.RMSNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype,
            name="sequence_output_layernorm")

        # === Functional model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32",
                                   name="padding_mask")
        x = self.token_embedding(token_ids)
        if embedding_scale is not None:
            x = x * embedding_scale
        for block in self.transformer_layers:
            x = block(x, padding_mask=padding_mask)
        outputs = self.layer_norm(x)
        super().__init__(
            inputs={"token_ids": token_ids, "padding_mask": padding_mask},
            outputs=outputs, dtype=dtype, **kwargs)

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_query_heads = num_query_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.num_key_value_heads = kv_heads
        self.window_size = window_size
        self.num_slots = num_slots
        self.embedding_scale = embedding_scale
        self.tie_word_embeddings = tie_word_embeddings
        for name, value in shared.items():
            setattr(self, name, value)

    @staticmethod
    def get_layout_map(device_mesh, model_parallel_dim_name="model",
                       data_parallel_dim_name="batch"):
        """A `keras.distribution.LayoutMap` for `ModelParallel` training.

        Attention heads are split over the model axis, whole heads per
        device: the query, key, value and gate projections are sharded on
        their head axis, the output projection (and the RMSNorm over the
        heads before it) on its input heads. NHA's slots and window belong
        to a head, so every device runs the NHA operation on its own batch
        rows and heads without seeing the others' activations. The
        feedforward network is split Megatron-style (gate and up
        projections on their output axis, down projection on its input
        axis) and the token embedding on its vocabulary axis. Norms are
        replicated. Weights are not split over the data axis (unlike
        keras-hub's Gemma layout): with the model width split there too,
        XLA moves activations between layouts (all-to-alls in the prefill,
        batch gathers in decoding) instead of gathering weights. So the
        only cross-device traffic is Megatron's all-reduces (partial sums
        after the output and down projections, the RMSNorm statistics over
        the heads, the loss and argmax over the vocabulary shards) and the
        gradient reductions over the data axis. The map also lays out
        `NHACausalLM`'s decode caches (`cache/<entry>`: batch rows on the
        data axis, kv heads on the model axis).

        `num_query_heads`, `num_key_value_heads`, `intermediate_dim` and
        `vocabulary_size` must be multiples of the model axis size.

        Args:
            device_mesh: a `keras.distribution.DeviceMesh`.
            model_parallel_dim_name: the mesh axis that splits heads and
                weights.
            data_parallel_dim_name: the mesh axis that splits the batch.

        Returns:
            A `keras.distribution.LayoutMap` for
            `keras.distribution.ModelParallel(layout_map=...,
            batch_dim_name=data_parallel_dim_name)`.

        Example:

        >>> mesh = keras.distribution.DeviceMesh(
        ...     (2, 4), ("batch", "model"), keras.distribution.list_devices())
        >>> layout_map = NHABackbone.get_layout_map(mesh)
        >>> distribution = keras.distribution.ModelParallel(
        ...     layout_map=layout_map, batch_dim_name="batch")
        >>> with distribution.scope():
        ...     backbone = NHABackbone(
        ...         vocabulary_size=256, num_layers=2, num_query_heads=8,
        ...         num_key_value_heads=4, hidden_dim=64,
        ...         intermediate_dim=128, window_size=16, num_slots=8)
        """
        if not isinstance(device_mesh, keras.distribution.DeviceMesh):
            raise TypeError("`device_mesh`: expected a keras.distribution."
                            f"DeviceMesh, got {type(device_mesh).__name__}.")
        for name, axis in (("model_parallel_dim_name", model_parallel_dim_name),
                           ("data_parallel_dim_name", data_parallel_dim_name)):
            if axis not in device_mesh.axis_names:
                raise ValueError(
                    f"`{name}`: {axis!r} is not an axis of the device mesh "
                    f"(axis names: {list(device_mesh.axis_names)}).")
        model, data = model_parallel_dim_name, data_parallel_dim_name
        block = r"transformer_layer_\d+/"
        layout_map = keras.distribution.LayoutMap(device_mesh)
        layout_map["token_embedding/embeddings"] = (model, None)
        layout_map["token_embedding/reverse_embeddings"] = (None, model)
        # Kernels [hidden, heads, dim]; biases [heads, dim].
        layout_map[block + "attention/(query|key|value|gate)/kernel"] = (
            None, model, None)
        layout_map[block + "attention/(query|key|value)/bias"] = (model, None)
        # [heads * dim]: contiguous per head, so it splits like the heads.
        layout_map[block + "attention/output_norm/scale"] = (model,)
        layout_map[block + "attention/output/kernel"] = (model, None, None)
        layout_map[block + "feedforward_(gate|intermediate)_dense/kernel"] = (
            None, model)
        layout_map[block + "feedforward_output_dense/kernel"] = (model, None)
        # Decode caches (`NHACausalLM.get_initial_cache`): batch rows and kv
        # heads, like the keys and values that fill them.
        layout_map["cache/slot_(keys|values)"] = (data, model, None, None)
        layout_map["cache/(keys|window_keys|values|log_forget_gates)"] = (
            data, None, model, None)
        layout_map["cache/mask"] = (data, None)
        layout_map["cache/position"] = (data,)
        return layout_map

    def embed(self, token_ids):
        """Token embeddings as the first block sees them (scaled if set)."""
        x = self.token_embedding(token_ids)
        if self.embedding_scale is not None:
            x = x * self.embedding_scale
        return x

    def get_config(self):
        config = super().get_config()
        config.update(
            vocabulary_size=self.vocabulary_size, num_layers=self.num_layers,
            num_query_heads=self.num_query_heads, hidden_dim=self.hidden_dim,
            intermediate_dim=self.intermediate_dim,
            num_key_value_heads=self.num_key_value_heads,
            window_size=(list(self.window_size)
                         if isinstance(self.window_size, (list, tuple))
                         else self.window_size),
            num_slots=(list(self.num_slots)
                       if isinstance(self.num_slots, (list, tuple))
                       else self.num_slots),
            embedding_scale=self.embedding_scale,
            tie_word_embeddings=self.tie_word_embeddings,
            **{name: getattr(self, name) for name in SHARED_BLOCK_ARGUMENTS})
        return config
