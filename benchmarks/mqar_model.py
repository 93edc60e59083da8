"""The MQAR study's model settings, their state sizes and the model itself.

A setting is written as a short name, e.g. `nha-M64-W64`, `gsa-M64`,
`swa-W64`, `full` or `hybrid-M64`:

| name | layer 1 | layer 2 |
|---|---|---|
| `nha-M<m>-W<w>` | M=m slots, window w | the same |
| `gsa-M<m>` | M=m, W=0 (gated slot attention) | the same |
| `swa-W<w>` | M=0, window w (sliding window) | the same |
| `full` | M=0, global window (causal attention) | the same |
| `hybrid-M<m>` | M=m, W=0 (GSA) | M=0, global |

The recurrent state of a layer, per key/value head and in floats, is
`M * (K + V)` for the slots plus `min(W, T) * (K + V)` for the window; a
global layer keeps all `T` tokens.
"""

import re

_SETTING = re.compile(r"^(nha|gsa|swa|full|hybrid)((?:-[MW]\d+)*)$")
_DEFAULT_SLOTS = 64
_DEFAULT_WINDOW = 64


def parse_setting(name):
    """Per-layer windows and slot counts of a two-layer setting.

    Args:
        name: e.g. "nha-M64-W64" (see the module docstring); missing numbers
            default to M=64, W=64.

    Returns:
        `(windows, slots)`: two lists of one entry per layer; a window of
        None is global.
    """
    match = _SETTING.match(name) if isinstance(name, str) else None
    if not match:
        raise ValueError(f"`setting`: expected one of nha-M<m>-W<w>, gsa-M<m>,"
                         f" swa-W<w>, full, hybrid-M<m>; got {name!r}.")
    kind = match.group(1)
    numbers = dict((part[0], int(part[1:]))
                   for part in match.group(2).split("-")[1:])
    slots = numbers.get("M", _DEFAULT_SLOTS)
    window = numbers.get("W", _DEFAULT_WINDOW)
    allowed = {"nha": "MW", "gsa": "M", "swa": "W", "full": "",
               "hybrid": "M"}[kind]
    extra = set(numbers) - set(allowed)
    if extra:
        raise ValueError(f"`setting`: {kind!r} takes no "
                         f"{'/'.join(sorted(extra))}, got {name!r}.")
    if kind == "nha":
        return [window, window], [slots, slots]
    if kind == "gsa":
        return [0, 0], [slots, slots]
    if kind == "swa":
        return [window, window], [0, 0]
    if kind == "full":
        return [None, None], [0, 0]
    return [0, None], [slots, 0]


def state_floats(name, sequence_length, num_kv_heads, head_dim):
    """Recurrent state of the whole model per sequence, in floats.

    Args:
        name: a setting name.
        sequence_length: T (the size of a global layer's cache).
        num_kv_heads: key/value heads per layer.
        head_dim: K = V per head.

    Returns:
        The sum over layers of `num_kv_heads * (M + min(W, T)) * (K + V)`.
    """
    windows, slots = parse_setting(name)
    total = 0
    for window, slot_count in zip(windows, slots):
        kept = sequence_length if window is None else min(window,
                                                          sequence_length)
        total += num_kv_heads * (slot_count + kept) * 2 * head_dim
    return total


def _chunk_size_argument(chunk_size):
    """The backbone's `chunk_size` argument where it has one; without it
    (older `keras_nha`) the chunked kernel's default is set instead."""
    import inspect

    from keras_nha.models import NHABackbone

    if chunk_size is None:
        return {}
    if "chunk_size" in inspect.signature(NHABackbone.__init__).parameters:
        return {"chunk_size": chunk_size}
    from keras_nha.kernels import chunked

    chunked.chunked_nha.__kwdefaults__["chunk_size"] = chunk_size
    return {}


def build_mqar_model(setting, vocab_size, hidden_dim=128, num_heads=2,
                     intermediate_dim=256, implementation="auto",
                     short_conv=0, chunk_size=None, slots_only=False):
    """The two-layer NHABackbone of a setting, read out at the answers.

    The output projection is the token embedding (tied, as in Zoology): a
    value the model attends to maps straight back to its own logit, which
    matters with 4096 values that each appear in few answers.

    Args:
        setting: a setting name (module docstring).
        vocab_size: token ids.
        hidden_dim: model width.
        num_heads: query and key/value heads per layer.
        intermediate_dim: feed-forward width.
        implementation: NHA kernel choice, see `keras_nha.ops`.
        short_conv: kernel size of a causal depthwise convolution added to
            the token embeddings before the first layer (0: none). Zoology
            and Based give every MQAR model one: it hands each value token
            its key, which a model otherwise has to learn to fetch with a
            previous-token attention head first (and a GSA layer, without
            positions, hardly can).
        chunk_size: block length of the "chunked" kernel (None: its
            default).
        slots_only: close the window (W=0) of every layer that has slots;
            the weights are the same as with it open.

    Returns:
        A `keras.Model` mapping `{"token_ids" [B, T], "positions" [B, P]}` to
        logits `[B, P, vocab_size]` at the given positions only (the MQAR
        loss needs nothing else, which keeps the vocabulary cheap).
    """
    import keras

    from keras_nha.models import NHABackbone

    windows, slots = parse_setting(setting)
    if slots_only:
        windows = [0 if count else window
                   for window, count in zip(windows, slots)]
    backbone = NHABackbone(
        vocabulary_size=vocab_size, num_layers=len(windows),
        num_query_heads=num_heads, hidden_dim=hidden_dim,
        intermediate_dim=intermediate_dim, window_size=windows,
        num_slots=slots, tie_word_embeddings=True,
        implementation=implementation, **_chunk_size_argument(chunk_size))
    if isinstance(short_conv, bool) or not isinstance(short_conv, int) or (
            short_conv < 0):
        raise ValueError(f"`short_conv`: expected an int >= 0, got "
                         f"{short_conv!r}.")
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    positions = keras.Input((None,), dtype="int32", name="positions")
    padding_mask = keras.ops.ones_like(token_ids)
    if short_conv:
        # The backbone's own layers, with the convolution in between.
        hidden = backbone.token_embedding(token_ids)
        hidden = hidden + keras.layers.Conv1D(
            hidden_dim, short_conv, padding="causal", groups=hidden_dim,
            name="short_conv")(hidden)
        for block in backbone.transformer_layers:
            hidden = block(hidden, padding_mask=padding_mask)
        hidden = backbone.layer_norm(hidden)
    else:
        hidden = backbone({"token_ids": token_ids,
                           "padding_mask": padding_mask})
    picked = keras.ops.take_along_axis(hidden, positions[:, :, None], axis=1)
    logits = backbone.token_embedding(picked, reverse=True)
    return keras.Model({"token_ids": token_ids, "positions": positions},
                       logits, name=f"mqar_{setting.replace('-', '_')}")
