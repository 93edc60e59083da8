"""NHA over chunked tensors with a memory-lean custom gradient.

The forward loops over groups of chunks carrying the slot memory and keeps
only the output and the per-row log-sum-exp (plus the memory at each group
start). The backward loops over the groups in reverse, recomputes every
per-chunk intermediate (gates, decays, logits, probabilities) and carries the
memory's gradient. Nothing of size [T, T] or [T, W] outlives one group.

Inputs (a dict, acc dtype, layout of `layout.to_chunks`):
    `slot_query` `[Z, N, L, G, K]`, `fed_keys`, `fed_values`,
    `fed_log_gates` `[Z, N, L, *]`, `slot_keys` `[Z, K, M]`, `slot_values`
    `[Z, M, V]` (slot path, M > 0; the fed stream only when tokens enter the
    slots), `window_query` `[Z, N, L, G, K]`, `window_keys`, `window_values`
    `[Z, N + D - 1, L, *]`, `window_mask` `[Z, N + D - 1, L]` (window path,
    C > 0).
"""

import dataclasses

import tensorflow as tf

from keras_nha.kernels.xla import layout
from keras_nha.kernels.xla import slot_memory
from keras_nha.kernels.xla import window


@dataclasses.dataclass(frozen=True)
class Config:
    tiling: layout.Tiling
    capacity: int  # window ring C (0: no window)
    num_slots: int  # M (0: no slots)
    feeds: bool  # tokens leave the window into the slots
    scale: float


def _take(x, config, group_index, extra=0):
    return layout.take_chunks(x, group_index * config.tiling.group,
                              config.tiling.group + extra)


def _logits(config, inputs, group_index, memory):
    """Recomputable per-group terms: logits and what the readouts need."""
    parts = {}
    if config.num_slots:
        q = _take(inputs["slot_query"], config, group_index)
        slot = dict(q=q)
        if config.feeds:
            slot.update(
                keys=_take(inputs["fed_keys"], config, group_index),
                values=_take(inputs["fed_values"], config, group_index))
            slot["gate"] = slot_memory.gates(
                _take(inputs["fed_log_gates"], config, group_index))
            slot["starts"], slot["ends"] = slot_memory.chunk_states(
                slot["gate"], slot["keys"], slot["values"], *memory)
        else:
            slot.update(keys=None, values=None, gate=None, starts=memory,
                        ends=None)
        slot["logits"] = slot_memory.logits(q, slot["keys"], slot["gate"],
                                            slot["starts"][0], config.scale)
        parts["slot"] = slot
    if config.capacity:
        frame = config.tiling.frame
        win = dict(q=_take(inputs["window_query"], config, group_index))
        win["keys"], win["values"], mask = (
            window.frames(_take(inputs[name], config, group_index, frame - 1),
                          frame)
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
    peaks = [tf.reduce_max(p["logits"], axis=-1) for p in parts.values()]
    peak = peaks[0] if len(peaks) == 1 else tf.maximum(*peaks)
    total = 0.0
    out = 0.0
    for name, part in parts.items():
        weights = tf.exp(part["logits"] - peak[..., None])
        total += tf.reduce_sum(weights, axis=-1)
        if name == "slot":
            out += slot_memory.readout(weights, part["values"], part["gate"],
                                       part["starts"][1])
        else:
            out += window.readout(weights, part["values"])
    out = out / total[..., None]
    log_total = peak + tf.math.log(total)
    return _memory_after(parts, memory), {"out": out, "lse": log_total}


def _backward_group(config, inputs, group_index, memory, out, log_total,
                    d_out, carry, pending):
    parts = _logits(config, inputs, group_index, memory)
    delta = tf.reduce_sum(d_out * out, axis=-1)
    grads = {}
    if "window" in parts:
        win = parts["window"]
        probs = tf.exp(win["logits"] - log_total[..., None])
        d_query, d_keys, d_values = window.backward(
            win["q"], win["keys"], win["values"], probs, d_out, delta,
            config.scale)
        grads["window_query"] = d_query
        frame = config.tiling.frame
        new_pending = []
        for i, (name, d_frames) in enumerate(
                zip(("window_keys", "window_values"), (d_keys, d_values))):
            span = window.unframe(d_frames, frame)
            if frame > 1:
                # The last key chunks of this group's frames also got
                # gradient from the next group (done before: the loop runs
                # backward); the first ones will get more from the previous.
                span += tf.pad(pending[i], [[0, 0], [config.tiling.group, 0]]
                               + [[0, 0]] * (len(span.shape) - 2))
                new_pending.append(span[:, :frame - 1])
            grads[name] = span[:, frame - 1:]
        pending = tuple(new_pending)
    if "slot" in parts:
        slot = parts["slot"]
        probs = tf.exp(slot["logits"] - log_total[..., None])
        (grads["slot_query"], d_keys, d_values, d_gates,
         carry) = slot_memory.backward(
             slot["q"], slot["keys"], slot["values"], slot["gate"],
             slot["starts"], slot["ends"], carry, probs, slot["logits"],
             d_out, delta, config.scale)
        if config.feeds:
            grads.update(fed_keys=d_keys, fed_values=d_values,
                         fed_log_gates=d_gates)
    return carry, pending, grads


def _merge_groups(stacked):
    """`[num_groups, Z, P, ...]` -> `[Z, num_groups * P, ...]`."""
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


def _zeros_like_memory(inputs):
    return (tf.zeros_like(inputs["slot_keys"]),
            tf.zeros_like(inputs["slot_values"]))


def nha_core(config, inputs):
    """Runs NHA on chunked inputs; differentiable w.r.t. every float input.

    Returns `(out [Z, N, L, G, V], memory)`, memory being the final
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
            if config.capacity and config.tiling.frame > 1:
                pending = tuple(
                    tf.zeros_like(layout.take_chunks(
                        tensors[n], 0, config.tiling.frame - 1))
                    for n in ("window_keys", "window_values"))
            grad_names = [n for n in names
                          if n not in ("window_mask", "slot_keys",
                                       "slot_values")]

            def backward(index, carries):
                carry, pending = carries
                start = index * config.tiling.group
                group_memory = memory
                if keeps_memory:
                    group_memory = (stacked["start_keys"][index],
                                    stacked["start_values"][index])
                take = lambda x: layout.take_chunks(x, start,
                                                    config.tiling.group)
                carry, pending, grads = _backward_group(
                    config, tensors, index, group_memory,
                    take(out), stacked["lse"][index], take(d_out), carry,
                    pending)
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
