"""NHA over tiled tensors with a memory-lean custom gradient.

The forward loops over groups of chunks carrying the slot memory and keeps
only the output and the per-row log-sum-exp (plus the memory at each group
start). The backward loops over the groups in reverse, recomputes every
per-chunk intermediate (gates, decays, logits, probabilities) and carries the
memory's gradient. Nothing of size [T, T] or [T, W] outlives one group.

Inputs (a dict, acc dtype, layout of `layout.to_rows`, `tiling.rows` rows):
    `slot_query` `[Z, rows, G, K]`, `fed_keys`, `fed_values`,
    `fed_log_gates` `[Z, rows, *]`, `slot_keys` `[Z, K, M]`, `slot_values`
    `[Z, M, V]` (slot path, M > 0; the fed stream only when tokens enter the
    slots), `window_query` `[Z, rows, G, K]`, `window_keys`, `window_values`
    `[Z, key_rows, *]`, `window_mask` `[Z, key_rows]` (window path, C > 0).
"""

import dataclasses

import tensorflow as tf

from keras_nha.kernels.xla import layout
from keras_nha.kernels.xla import slot_memory
from keras_nha.kernels.xla import window


@dataclasses.dataclass(frozen=True)
class Config:
    """Static configuration of one compiled kernel (Python values only)."""

    tiling: layout.Tiling
    capacity: int  # window ring C (0: no window)
    num_slots: int  # M (0: no slots)
    feeds: bool  # tokens leave the window into the slots
    scale: float


def _logits(config, inputs, group_index, memory):
    """Recomputable per-group terms: logits and what the readouts need."""
    tiling = config.tiling
    start = group_index * tiling.group_rows

    def take(name, size, extra=0):
        rows = layout.take_rows(inputs[name], start, tiling.group_rows + extra)
        return layout.split_rows(rows, size)

    parts = {}
    if config.num_slots:
        size = tiling.slot_chunk
        slot = dict(q=take("slot_query", size), keys=None, values=None,
                    gate=None, starts=memory, ends=None, size=size)
        if config.feeds:
            slot.update(keys=take("fed_keys", size),
                        values=take("fed_values", size),
                        gate=slot_memory.gates(take("fed_log_gates", size)))
            slot["starts"], slot["ends"] = slot_memory.chunk_states(
                slot["gate"], slot["keys"], slot["values"], *memory)
        slot["logits"] = slot_memory.logits(slot["q"], slot["keys"],
                                            slot["gate"], slot["starts"][0],
                                            config.scale)
        parts["slot"] = slot
    if config.capacity:
        size, frame = tiling.window_block, tiling.frame
        win = dict(q=take("window_query", size), size=size)
        win["keys"], win["values"], mask = (
            window.frames(take(name, size, tiling.spill_rows), frame)
            for name in ("window_keys", "window_values", "window_mask"))
        win["logits"] = window.logits(win["q"], win["keys"], mask,
                                      config.capacity, config.scale)
        parts["window"] = win
    return parts


def _memory_after(parts, memory):
    slot = parts.get("slot")
    if slot is None or slot["gate"] is None:
        return memory
    return slot["ends"][0][:, -1], slot["ends"][1][:, -1]


def _forward_group(config, inputs, group_index, memory):
    parts = _logits(config, inputs, group_index, memory)
    # Rows of the group, [Z, R, G]: parts tile them in different chunks.
    peaks = [layout.merge_rows(tf.reduce_max(p["logits"], axis=-1))
             for p in parts.values()]
    peak = peaks[0] if len(peaks) == 1 else tf.maximum(*peaks)
    total = 0.0
    out = 0.0
    for name, part in parts.items():
        shift = layout.split_rows(peak, part["size"])[..., None]
        weights = tf.exp(part["logits"] - shift)
        total += layout.merge_rows(tf.reduce_sum(weights, axis=-1))
        if name == "slot":
            read = slot_memory.readout(weights, part["values"], part["gate"],
                                       part["starts"][1])
        else:
            read = window.readout(weights, part["values"])
        out += layout.merge_rows(read)
    out = out / total[..., None]
    log_total = peak + tf.math.log(total)
    return _memory_after(parts, memory), {"out": out, "lse": log_total}


def _backward_group(config, inputs, group_index, memory, out, log_total,
                    d_out, carry, pending):
    tiling = config.tiling
    parts = _logits(config, inputs, group_index, memory)
    delta = tf.reduce_sum(d_out * out, axis=-1)
    grads = {}

    def split(x, part):
        return layout.split_rows(x, part["size"])

    if "window" in parts:
        win = parts["window"]
        probs = tf.exp(win["logits"] - split(log_total, win)[..., None])
        d_query, d_keys, d_values = window.backward(
            win["q"], win["keys"], win["values"], probs, split(d_out, win),
            split(delta, win), config.scale)
        grads["window_query"] = layout.merge_rows(d_query)
        spill = tiling.spill_rows
        new_pending = []
        for i, (name, d_frames) in enumerate(
                zip(("window_keys", "window_values"), (d_keys, d_values))):
            rows = layout.merge_rows(window.unframe(d_frames, tiling.frame))
            if spill:
                # The last key rows of this group's frames also got gradient
                # from the next group (done before: the loop runs backward);
                # the first ones will get more from the previous group.
                rows += tf.pad(pending[i], [[0, 0], [tiling.group_rows, 0]]
                               + [[0, 0]] * (len(rows.shape) - 2))
                new_pending.append(rows[:, :spill])
            grads[name] = rows[:, spill:]
        pending = tuple(new_pending)
    if "slot" in parts:
        slot = parts["slot"]
        probs = tf.exp(slot["logits"] - split(log_total, slot)[..., None])
        d_query, d_keys, d_values, d_gates, carry = slot_memory.backward(
            slot["q"], slot["keys"], slot["values"], slot["gate"],
            slot["starts"], slot["ends"], carry, probs, slot["logits"],
            split(d_out, slot), split(delta, slot), config.scale)
        grads["slot_query"] = layout.merge_rows(d_query)
        if config.feeds:
            grads.update(fed_keys=layout.merge_rows(d_keys),
                         fed_values=layout.merge_rows(d_values),
                         fed_log_gates=layout.merge_rows(d_gates))
    return carry, pending, grads


def _merge_groups(stacked):
    """`[num_groups, Z, R, ...]` -> `[Z, num_groups * R, ...]`."""
    rank = len(stacked.shape)
    x = tf.transpose(stacked, [1, 0] + list(range(2, rank)))
    return tf.reshape(x, [-1, x.shape[1] * x.shape[2]] + list(x.shape[3:]))


def _run_groups(num_groups, body, carry, names, dtype, reverse=False):
    """Runs `body(group_index, carry) -> (carry, outputs)` for every group.

    `outputs` is a dict with keys `names`, all of `dtype`. Returns the final
    carry and each output stacked `[num_groups, ...]`. One group runs without
    a loop.
    """
    if num_groups == 1:
        carry, outputs = body(0, carry)
        return carry, {n: outputs[n][None] for n in names}

    def step(i, carry, arrays):
        index = num_groups - 1 - i if reverse else i
        carry, outputs = body(index, carry)
        arrays = {n: arrays[n].write(index, outputs[n]) for n in names}
        return i + 1, carry, arrays

    arrays = {n: tf.TensorArray(dtype, size=num_groups) for n in names}
    _, carry, arrays = tf.while_loop(
        lambda i, *_: i < num_groups, step, (0, carry, arrays))
    return carry, {n: a.stack() for n, a in arrays.items()}


def nha_core(config, inputs):
    """Runs NHA on chunked inputs; differentiable w.r.t. every float input.

    Returns `(out [Z, rows, G, V], memory)`, memory being the final
    `(slot_keys, slot_values)` or None without slots.
    """
    names = sorted(inputs)
    groups = config.tiling.num_groups
    has_slots = bool(config.num_slots)
    keeps_memory = has_slots and config.feeds

    @tf.custom_gradient
    def core(*flat):
        tensors = dict(zip(names, flat))
        dtype = flat[0].dtype
        memory = ((tensors["slot_keys"], tensors["slot_values"]) if has_slots
                  else ())

        def forward(index, memory):
            new_memory, outputs = _forward_group(config, tensors, index,
                                                 memory)
            if keeps_memory:
                outputs["start_keys"], outputs["start_values"] = memory
            return new_memory, outputs

        saved = ("out", "lse") + (("start_keys", "start_values")
                                  if keeps_memory else ())
        final, stacked = _run_groups(groups, forward, memory, saved, dtype)
        out = _merge_groups(stacked["out"])

        def grad(d_out, *d_memory):
            d_out = tf.convert_to_tensor(d_out)
            carry = tuple(
                tf.zeros_like(m) if d is None else tf.convert_to_tensor(d)
                for m, d in zip(memory, d_memory))
            pending = ()
            if config.capacity and config.tiling.spill_rows:
                pending = tuple(
                    tf.zeros_like(tensors[n][:, :config.tiling.spill_rows])
                    for n in ("window_keys", "window_values"))
            grad_names = [n for n in names
                          if n not in ("window_mask", "slot_keys",
                                       "slot_values")]

            def backward(index, carries):
                carry, pending = carries
                start = index * config.tiling.group_rows
                group_memory = memory
                if keeps_memory:
                    group_memory = (
                        layout.take_group(stacked["start_keys"], index),
                        layout.take_group(stacked["start_values"], index))
                take = lambda x: layout.take_rows(x, start,
                                                  config.tiling.group_rows)
                carry, pending, grads = _backward_group(
                    config, tensors, index, group_memory, take(out),
                    layout.take_group(stacked["lse"], index), take(d_out),
                    carry, pending)
                return (carry, pending), grads

            (carry, pending), stacked_grads = _run_groups(
                groups, backward, (carry, pending), grad_names, dtype,
                reverse=True)
            grads = {n: _merge_groups(g) for n, g in stacked_grads.items()}
            for n, early in zip(("window_keys", "window_values"), pending):
                grads[n] = tf.concat([early, grads[n]], axis=1)
            if has_slots:
                grads["slot_keys"], grads["slot_values"] = carry
            return [grads.get(n) for n in names]

        return (out,) + tuple(final), grad

    results = core(*[inputs[n] for n in names])
    return results[0], (tuple(results[1:]) if has_slots else None)
