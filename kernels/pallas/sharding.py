"""Running the NHA core once per shard of batch and kv heads.

`pallas_call` is opaque to XLA's SPMD partitioner, which would gather a
sharded operand onto every device. Batch rows and kv heads (with their query
heads) are independent in NHA, so the core is wrapped in
`custom_partitioning`: its rule keeps the operands' batch and head shardings
and replicates the rest (time, head dims, slots); each device then runs the
kernels on its own rows and heads, and no activation is gathered.

The queries travel as `[B, T, Hkv, G, K]` so that query and kv heads share
one head factor. JAX cannot differentiate through `custom_partitioning`, so
the forward and backward are partitioned separately under one `custom_vjp`;
the backward recomputes the forward (one extra forward pass). That cost is
paid only when JAX sees more than one device: on one device the core runs
directly.
"""

import functools
import math

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

# Shardy factors of each history stream the core may take (`sequence.py`):
# "b" batch, "c" kv heads (both split as the first operand is); the rest
# replicated ("l" the history or fed stream, "r" the ring part's rows).
_HISTORY = {"keys": "b l c k", "window_keys": "b l c k", "values": "b l c v",
            "log_forget_gates": "b l c m", "mask": "b l",
            "window_values": "b l c v", "window_mask": "b l",
            "ring_keys": "b r c k",
            "ring_values": "b r c v", "ring_mask": "b r"}
_OUT_FACTORS = ("b t c g v", "b c k m", "b c m v")


def _arg_factors(names):
    """Factors of the flat core's operands: queries, `names`, memory."""
    return (("b t c g k", "b t c g k") + tuple(_HISTORY[n] for n in names)
            + ("b c k m", "b c m v"))


def _flat(core, static, names):
    """The core on flat, grouped operands: `(q, qw, *history, sk, sv)`, the
    history streams being `names` in order."""
    def run(q, qw, *operands):
        *streams, sk, sv = operands
        batch, length, kv_heads, groups, key_dim = q.shape
        heads = (batch, length, kv_heads * groups, key_dim)
        history = dict(zip(names, streams))
        out, sk, sv = core(q.reshape(heads), qw.reshape(heads), history, sk,
                           sv, **static)
        return out.reshape(q.shape[:4] + out.shape[-1:]), sk, sv
    return run


def _axes(mesh, operand, batch_axis, head_axis):
    """Mesh axes of `operand`'s batch and head dims (None: replicated)."""
    spec = tuple(operand.sharding.spec) + (None,) * operand.ndim
    batch, heads = spec[batch_axis], spec[head_axis]
    size = lambda axis: (1 if axis is None else mesh.shape[axis]
                         if isinstance(axis, str)
                         else math.prod(mesh.shape[a] for a in axis))
    if batch is not None and operand.shape[batch_axis] % size(batch):
        batch = None
    if heads is not None and operand.shape[head_axis] % size(heads):
        heads = None
    return batch, heads


def _shardings(mesh, factors, batch, heads):
    split = {"b": batch, "c": heads}
    return tuple(NamedSharding(mesh, PartitionSpec(
        *[split.get(f) for f in operand.split()])) for operand in factors)


def _partitioned(fn, arg_factors, out_factors):
    """`fn` under `custom_partitioning`: batch and head dims keep the first
    operand's sharding, every other dim is replicated."""
    wrapped = custom_partitioning(fn)
    first = arg_factors[0].split()
    lead_axes = lambda mesh, shapes: _axes(mesh, shapes[0], first.index("b"),
                                           first.index("c"))

    def infer(mesh, arg_shapes, result_shape):
        del result_shape
        return _shardings(mesh, out_factors, *lead_axes(mesh, arg_shapes))

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        axes = lead_axes(mesh, arg_shapes)
        return (mesh, fn, _shardings(mesh, out_factors, *axes),
                _shardings(mesh, arg_factors, *axes))

    rule = ", ".join(arg_factors) + " -> " + ", ".join(out_factors)
    # Shardy wants these in the order the factors first appear in the rule.
    order = dict.fromkeys(" ".join(arg_factors + out_factors).split())
    replicated = tuple(f for f in order if f not in ("b", "c"))
    wrapped.def_partition(
        partition=partition, infer_sharding_from_operands=infer,
        propagate_user_sharding=lambda mesh, user_shape: user_shape.sharding,
        sharding_rule=rule, need_replication_factors=replicated)
    return wrapped


def per_shard_readout(readout, arg_factors, out_factors):
    """A forward-only kernel call, run once per shard of batch and kv heads.

    Args:
        readout: a function of arrays returning one array.
        arg_factors: Shardy factor names per operand, e.g. "b c g k" ("b"
            batch, "c" kv heads; every other factor is replicated); the
            first operand, which has both, decides the split.
        out_factors: the same for the result.

    Returns:
        `readout`, partitioned when JAX sees more than one device.
    """
    if jax.device_count() == 1:
        return readout
    partitioned = _partitioned(lambda *operands: (readout(*operands),),
                               arg_factors, (out_factors,))
    return lambda *operands: partitioned(*operands)[0]


def per_shard(core, **static):
    """`core(query, window_query, history, slot_keys, slot_values)`, sharded.

    Args:
        core: the NHA core; `static` holds its keyword-only arguments.

    Returns:
        A function of the same operands (queries `[B, T, H, K]`).
    """
    if jax.device_count() == 1:
        return functools.partial(core, **static)

    def sharded_core(names):
        run = _flat(core, static, names)
        arg_factors = _arg_factors(names)
        forward = _partitioned(run, arg_factors, _OUT_FACTORS)
        num_args = len(arg_factors)

        def backward_fn(*operands):
            primals, cotangents = operands[:num_args], operands[num_args:]
            return jax.vjp(run, *primals)[1](tuple(cotangents))

        backward = _partitioned(backward_fn, arg_factors + _OUT_FACTORS,
                                arg_factors)

        @jax.custom_vjp
        def sharded(*operands):
            return forward(*operands)

        sharded.defvjp(lambda *operands: (forward(*operands), operands),
                       lambda operands, cotangents: backward(*operands,
                                                             *cotangents))
        return sharded

    def call(query, window_query, history, slot_keys, slot_values):
        batch, length, heads, key_dim = query.shape
        kv_heads = history["keys"].shape[2]
        grouped = (batch, length, kv_heads, heads // kv_heads, key_dim)
        names = tuple(n for n in _HISTORY if n in history)
        out, slot_keys, slot_values = sharded_core(names)(
            query.reshape(grouped), window_query.reshape(grouped),
            *[history[n] for n in names], slot_keys, slot_values)
        return (out.reshape(batch, length, heads, out.shape[-1]), slot_keys,
                slot_values)

    return call
