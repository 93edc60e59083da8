"""Causal language model on `NHABackbone`, with constant-memory generation."""

import math

import keras
from keras import ops
from keras_hub.models import CausalLM

from keras_nha.kernels.state import state_dtype
from keras_nha.models.nha_backbone import GLOBAL_WINDOW
from keras_nha.models.nha_backbone import NHABackbone
from keras_nha.models.nha_causal_lm_preprocessor import NHACausalLMPreprocessor
from keras_nha.models.nha_presets import explained_preset_loading

def _unread_entries(attention, capacity):
    """State entries that `attention`'s NHA writes but never reads back.

    A ring shorter than the window (a global layer: the whole sequence
    fits) never evicts a token, so the slot memory stays zero and the
    slot-path `keys` and `log_forget_gates` are never read; without slots
    nothing reads `keys` either. `_unpack` refills them with zeros.
    """
    unread = set()
    if capacity < attention.window_size:
        unread.update(("slot_keys", "slot_values", "keys", "log_forget_gates"))
    if not attention.num_slots:
        unread.add("keys")
    return unread


def _pack(state, attention, batch_size):
    """Generation cache entry: the batch-major leaves that are read.

    Samplers tile and gather every leaf along axis 0, which fails on
    zero-size tensors (no slots, or no window) and on the scalar position:
    the former are left out, the latter repeated per row. Entries that
    `attention` never reads (`_unread_entries`) are left out too.
    """
    unread = _unread_entries(attention, state["mask"].shape[1])
    packed = {n: t for n, t in state.items()
              if n != "position" and n not in unread
              and 0 not in tuple(t.shape)}
    packed["position"] = ops.cast(state["position"], "int32") + ops.zeros(
        (batch_size,), "int32")
    return packed


def _mesh_size(mesh, axis):
    if axis is None:
        return 1
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    sizes = dict(zip(mesh.axis_names, mesh.shape))
    return math.prod(sizes[name] for name in names)


def _distribute(tensor, path=None):
    """`tensor` laid out for the current `keras.distribution`, if any.

    The layout is the layout map's entry for `path` when there is one, else
    the data layout (batch axis split); an axis that does not divide evenly
    over its mesh axis stays whole.
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        return tensor
    shape = tuple(tensor.shape)
    layout = distribution.get_tensor_layout(path) if path else None
    if layout is None or len(layout.axes) != len(shape):
        layout = distribution.get_data_layout(shape)
    mesh = distribution.device_mesh
    axes = [axis if size is not None and size % _mesh_size(mesh, axis) == 0
            else None for axis, size in zip(layout.axes, shape)]
    return keras.distribution.distribute_tensor(
        tensor, keras.distribution.TensorLayout(axes, mesh))


def _distribute_cache(packed):
    """Shards a `_pack`ed entry like the activations that fill it.

    `NHABackbone.get_layout_map` lays out `cache/<entry>` on batch rows and
    kv heads; other distributions split the batch axis only.
    """
    return {name: _distribute(tensor, f"cache/{name}")
            for name, tensor in packed.items()}


def _unpack(packed, attention, batch_size):
    """The NHA state of `attention` from a `_pack`ed entry."""
    state = dict(packed, position=packed["position"][0])
    capacity = packed["mask"].shape[1] if "mask" in packed else 0
    heads, dim, slots = (attention.num_kv_heads, attention._head_dim,
                         attention.num_slots)
    ring_dtype = attention.compute_dtype
    acc = state_dtype(ring_dtype)
    shapes = {
        "slot_keys": ((heads, dim, slots), acc),
        "slot_values": ((heads, slots, dim), acc),
        "keys": ((capacity, heads, dim), ring_dtype),
        "window_keys": ((capacity, heads, dim), ring_dtype),
        "values": ((capacity, heads, dim), ring_dtype),
        "log_forget_gates": ((capacity, heads, slots), acc),
        "mask": ((capacity,), acc),
    }
    for name, (shape, dtype) in shapes.items():
        if name not in state:
            state[name] = ops.zeros((batch_size,) + shape, dtype)
    return state


def _stop_locations(token_ids, stop_token_ids, prompt_mask):
    hits = [ops.equal(token_ids, ops.cast(t, token_ids.dtype))
            for t in stop_token_ids]
    return ops.logical_and(ops.any(ops.stack(hits), axis=0),
                           ops.logical_not(prompt_mask))


@keras.saving.register_keras_serializable(package="keras_nha")
@explained_preset_loading
class NHACausalLM(CausalLM):
    """An end-to-end NHA language model for training and generation.

    `fit()` trains next-token prediction on text (with a preprocessor) or on
    `{"token_ids", "padding_mask"}` batches. `generate()` keeps, per layer,
    only the NHA state: a float32 slot memory and a ring of the last W
    tokens, so its memory does not grow with the generated length (a global
    layer's ring holds the whole sequence, like a KV cache: twice the padded
    length inside `generate()`, see `_build_cache`). The prompt
    is absorbed by one prefill through the fast sequence path, then each new
    token costs one decode step. Every keras-hub sampler works
    (`compile(sampler=...)`).

    Args:
        backbone: an `NHABackbone`.
        preprocessor: an `NHACausalLMPreprocessor` or None (then inputs are
            `{"token_ids", "padding_mask"}` and `generate` needs explicit
            `stop_token_ids`).
        **kwargs: `keras_hub.models.CausalLM` arguments.

    Returns:
        Logits `[B, T, vocabulary_size]` when called.

    Example:

    >>> tokenizer = keras_nha.models.NHATokenizer()
    >>> backbone = keras_nha.models.NHABackbone(
    ...     vocabulary_size=tokenizer.vocabulary_size(), num_layers=2,
    ...     num_query_heads=4, hidden_dim=64, intermediate_dim=128,
    ...     window_size=16, num_slots=8)
    >>> lm = keras_nha.models.NHACausalLM(
    ...     backbone, keras_nha.models.NHACausalLMPreprocessor(
    ...         tokenizer, sequence_length=64))
    >>> lm.compile(sampler="greedy")
    >>> text = lm.generate("def ", max_length=32)
    """

    backbone_cls = NHABackbone
    preprocessor_cls = NHACausalLMPreprocessor

    def __init__(self, backbone, preprocessor=None, **kwargs):
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Functional model ===
        inputs = backbone.input
        hidden_states = backbone(inputs)
        outputs = backbone.token_embedding(hidden_states, reverse=True)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

    def get_initial_cache(self, batch_size, max_length=None):
        """An empty generation cache.

        Args:
            batch_size: rows to decode.
            max_length: the most tokens the cache will absorb; required when
                a layer is global (its ring holds the whole sequence).

        Returns:
            A tuple with one NHA state dict per layer (see
            `keras_nha.ops.initial_state`), except that `position` is
            repeated per row (`[batch_size]`, all equal) and zero-size
            entries are left out, so that samplers can tile and gather every
            entry along the batch axis; so are entries a layer never reads
            (the slot-path keys of a layer without slots; the slot memory
            and slot-path ring of a layer whose ring holds the whole
            sequence). Under a `keras.distribution` the
            entries are sharded like the activations that fill them (batch
            rows, and kv heads under `NHABackbone.get_layout_map`).
        """
        if max_length is None:
            global_layers = [
                i for i, block in enumerate(self.backbone.transformer_layers)
                if block.attention.window_size == GLOBAL_WINDOW]
            if global_layers:
                raise ValueError(
                    f"`max_length`: layers {global_layers} are global "
                    "(window_size None), so their ring holds the whole "
                    "sequence; pass max_length (prompt plus new tokens).")
        return tuple(
            _distribute_cache(_pack(
                block.get_initial_cache(batch_size, max_length),
                block.attention, batch_size))
            for block in self.backbone.transformer_layers)

    def call_with_cache(self, token_ids, cache, cache_update_index=None,
                        padding_mask=None):
        """Runs new tokens through the model, continuing from `cache`.

        Args:
            token_ids: `[B, T]` ids of the next T tokens.
            cache: from `get_initial_cache()` or an earlier call.
            cache_update_index: accepted for keras-hub compatibility and
                ignored: positions live in the cache.
            padding_mask: optional `[B, T]`, 1 for real tokens; padded tokens
                are never absorbed into the cache.

        Returns:
            `(logits [B, T, vocab], hidden_states [B, T, D], new_cache)`.
        """
        del cache_update_index
        # Keeps decoding split over batch rows (the sampler's loop carries
        # the token buffer, which XLA would otherwise replicate).
        token_ids = _distribute(token_ids)
        batch_size = ops.shape(token_ids)[0]
        x = self.backbone.embed(token_ids)
        new_cache = []
        for block, packed in zip(self.backbone.transformer_layers, cache):
            state = _unpack(packed, block.attention, batch_size)
            x, state = block(x, padding_mask=padding_mask, cache=state)
            new_cache.append(_distribute_cache(_pack(state, block.attention,
                                                     batch_size)))
        hidden_states = self.backbone.layer_norm(x)
        logits = self.backbone.token_embedding(hidden_states, reverse=True)
        return logits, hidden_states, tuple(new_cache)

    def _build_cache(self, token_ids, index):
        """Absorbs the first `index - 1` prompt tokens of every row.

        keras-hub's sampling loop feeds token `index - 1` itself first, so
        the prefill stops one token short. Its length must be static, so
        those tokens are moved to the END of the buffer with padding before
        them (padding never enters an NHA state, and rotary logits depend
        only on relative positions); generation then continues at
        position `length`.
        """
        batch_size = ops.shape(token_ids)[0]
        length = token_ids.shape[1]
        if length is None:
            raise ValueError("`token_ids`: generation needs a static sequence "
                             "length (pad prompts to a fixed length).")
        absorbed = ops.maximum(index - 1, 0)
        steps = ops.arange(length, dtype="int32")
        shifted = ops.take(token_ids, ops.mod(steps + absorbed, length),
                           axis=1)
        shifted_mask = ops.cast(steps >= length - absorbed, "int32")
        shifted_mask = ops.zeros_like(token_ids, "int32") + shifted_mask
        # The loop runs up to `length - index` more steps after the prefill.
        cache = self.get_initial_cache(batch_size, max_length=2 * length)
        _, hidden, cache = self.call_with_cache(shifted, cache,
                                                padding_mask=shifted_mask)
        hidden = ops.take(hidden, ops.mod(steps + length - absorbed, length),
                          axis=1)
        # The hidden state of token `index - 1` (the contrastive sampler
        # compares against it); the cache of this step is discarded.
        zero = ops.zeros_like(index)
        last = ops.slice(token_ids, [zero, index - 1], [batch_size, 1])
        _, last_hidden, _ = self.call_with_cache(last, cache)
        hidden = ops.slice_update(hidden, [zero, index - 1, zero],
                                  last_hidden)
        return hidden, cache

    def generate_step(self, inputs, stop_token_ids=None):
        """Generates one batch (keras-hub's compiled generation function).

        Args:
            inputs: `{"token_ids", "padding_mask"}`, prompts right-padded to
                the generation length; every prompt needs at least one token
                (the preprocessor adds `<s>`).
            stop_token_ids: ids that end a row, or None.

        Returns:
            `{"token_ids", "padding_mask"}` with the generated tokens.
        """
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        padding_mask = ops.cast(padding_mask, "bool")
        row_lengths = ops.sum(ops.cast(padding_mask, "int32"), axis=-1)
        index = ops.maximum(ops.min(row_lengths), ops.ones((), "int32"))
        hidden_states, cache = self._build_cache(token_ids, index)

        def next(prompt, cache, index):
            batch_size = ops.shape(prompt)[0]
            index = ops.cast(index, "int32")
            prompt = ops.slice(prompt, [ops.zeros_like(index), index - 1],
                               [batch_size, 1])
            logits, hidden_states, cache = self.call_with_cache(prompt, cache)
            return (ops.squeeze(logits, axis=1),
                    ops.squeeze(hidden_states, axis=1), cache)

        token_ids = self.sampler(
            next=next, prompt=token_ids, cache=cache, index=index,
            mask=padding_mask, stop_token_ids=stop_token_ids,
            hidden_states=hidden_states, model=self)

        if stop_token_ids is None:
            output_mask = ops.ones_like(token_ids, dtype="bool")
        else:
            ends = ops.cast(_stop_locations(token_ids, stop_token_ids,
                                            padding_mask), "int32")
            # Keep the first stop token, drop everything after it.
            after = ops.cumsum(ends, axis=-1) - ends
            output_mask = ops.equal(after, 0)
        return {"token_ids": token_ids, "padding_mask": output_mask}
