"""NHA models under `keras.distribution` on 8 host CPU devices (JAX).

Spawned by `nha_distribution_test.py` in a fresh process, because JAX reads
`XLA_FLAGS` (the host device count) only when it starts. It trains and
generates with the same weights on one device and under each distribution,
and prints one JSON object (after a `RESULT ` prefix) with what the tests
assert on: losses, generated tokens, the shardings of weights, of the NHA
operation's inputs and of the decode caches, and the collectives in the
compiled HLO of one decoder block's forward and backward pass.

    python tests/models/distribution_check.py [scenario ...]
"""

import contextlib
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time

# The compiled train step and generate function are read back from XLA's
# dumps (no second compilation).
DUMP = tempfile.mkdtemp(prefix="nha_distribution_hlo_")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") +
    " --xla_force_host_platform_device_count=8 --xla_dump_to=" + DUMP +
    " --xla_dump_hlo_as_text"
    " --xla_dump_hlo_module_re=.*(train_step|generate).*")
os.environ["KERAS_BACKEND"] = "jax"
os.environ["JAX_ENABLE_X64"] = "0"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_nha.layers import nha_layer  # noqa: E402
from keras_nha.models import NHABackbone  # noqa: E402
from keras_nha.models import NHACausalLM  # noqa: E402
from keras_nha.models import NHADecoderBlock  # noqa: E402

# Prime T: no weight has a dimension of T, 2T, 4T or 8T, so a collective
# with such a dimension moves activations.
LENGTH = 13
BATCH = 8
CONFIG = dict(vocabulary_size=64, num_layers=3, num_query_heads=8,
              num_key_value_heads=4, hidden_dim=32, intermediate_dim=64,
              window_size=[3, None, 0], num_slots=[4, 0, 3])
PROMPT_LENGTHS = [3, 5, 4, 6, 3, 2, 5, 4]
GENERATE_LENGTH = 10
_START = time.time()


def log(message):
    print(f"[{time.time() - _START:6.1f} s] {message}", file=sys.stderr,
          flush=True)


def make_distribution(name):
    devices = keras.distribution.list_devices()
    if name == "single":
        return None
    if name == "data":
        return keras.distribution.DataParallel(devices=devices)
    shape = {"model": (1, 4), "data_and_model": (2, 4)}[name]
    mesh = keras.distribution.DeviceMesh(
        shape, ("batch", "model"), devices[:shape[0] * shape[1]])
    return keras.distribution.ModelParallel(
        layout_map=NHABackbone.get_layout_map(mesh), batch_dim_name="batch")


def spec(sharding, rank):
    """A sharding as a list of mesh axis names (or None) per array axis."""
    entries = list(getattr(sharding, "spec", ())) + [None] * rank
    return [None if e is None or e == () else
            (e if isinstance(e, str) else "+".join(e)) for e in entries[:rank]]


class ShardingSpy:
    """Wraps the NHA operations the layer calls; records input shardings.

    `jax.debug.inspect_array_sharding` reports the sharding that XLA's
    partitioner settled on inside the compiled program.
    """

    def __init__(self):
        self.records = {}
        self._originals = {}

    def _wrap(self, name):
        original = getattr(nha_layer.nha_ops, name)
        self._originals[name] = original

        def spied(*args, **kwargs):
            tensors = {k: v for k, v in kwargs.items()
                       if hasattr(v, "shape") and k != "padding_mask"}
            for key, value in kwargs.get("state", {}).items():
                if value.ndim:
                    tensors[f"state/{key}"] = value
            for key, value in tensors.items():
                record = self.records.setdefault(name, {})

                def callback(sharding, key=key, rank=value.ndim):
                    record[key] = spec(sharding, rank)

                jax.debug.inspect_array_sharding(value, callback=callback)
            return original(*args, **kwargs)

        setattr(nha_layer.nha_ops, name, spied)

    def __enter__(self):
        self._wrap("native_hybrid_attention")
        self._wrap("native_hybrid_attention_step")
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(nha_layer.nha_ops, name, original)


def initial_weights():
    keras.utils.set_random_seed(0)
    lm = NHACausalLM(NHABackbone(**CONFIG))
    rng = np.random.default_rng(0)
    # Large enough logits for an unambiguous greedy argmax.
    return [rng.normal(0, 0.5, w.shape).astype("float32") +
            (1.0 if "norm" in w.path else 0.0) for w in lm.weights]


def data():
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 64, (BATCH, LENGTH + 1)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((BATCH, LENGTH),
                                                           "int32")}
    prompts = np.zeros((BATCH, GENERATE_LENGTH), "int32")
    prompt_mask = np.zeros_like(prompts)
    for row, n in enumerate(PROMPT_LENGTHS):
        prompts[row, :n] = ids[row, :n]
        prompt_mask[row, :n] = 1
    return x, ids[:, 1:], {"token_ids": prompts, "padding_mask": prompt_mask}


def collectives(hlo):
    """`{op: [result dims, ...]}` of the cross-device ops in compiled HLO."""
    found = {}
    pattern = re.compile(r"=\s*(.*?)\s(all-gather|all-to-all|"
                         r"collective-permute|all-reduce|reduce-scatter)"
                         r"(-start)?\(")
    for line in hlo.splitlines():
        match = pattern.search(line)
        if not match:
            continue
        shapes = re.findall(r"[a-z]+\d*\[([\d,]*)\]", match.group(1))
        for dims in shapes:
            found.setdefault(match.group(2), []).append(
                [int(d) for d in dims.split(",") if d])
    return found


def dumped_hlo(name):
    """The optimized HLO of the last dumped module called `name`; clears
    the dump folder."""
    files = sorted(glob.glob(os.path.join(
        DUMP, f"*{name}*after_optimizations.txt")))
    files = [f for f in files if "buffer-assignment" not in f]
    text = open(files[-1]).read() if files else ""
    for entry in os.listdir(DUMP):
        path = os.path.join(DUMP, entry)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return text


def cache_shapes(cache, hlo):
    """How often each cache entry appears in `hlo` at its global and at its
    per-device shape (entries of rank >= 3 only)."""
    found = {}
    for layer, entries in enumerate(cache):
        for key, value in entries.items():
            if value.ndim < 3:
                continue
            local = value.sharding.shard_shape(value.shape)
            text = lambda shape: "f32[" + ",".join(map(str, shape)) + "]"
            found[f"{layer}/{key}"] = {
                "global": list(value.shape), "local": list(local),
                "global_count": (hlo.count(text(value.shape))
                                 if tuple(local) != tuple(value.shape)
                                 else None),
                "local_count": hlo.count(text(local))}
    return found


def block_hlo(block, distribution):
    """Collectives of a jitted forward + backward of one decoder block."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec

    x = jax.device_put(
        np.random.default_rng(2).normal(
            size=(BATCH, LENGTH, CONFIG["hidden_dim"])).astype("float32"),
        NamedSharding(distribution.device_mesh.backend_mesh,
                      PartitionSpec(distribution.batch_dim_name, None, None)))
    trainable = [v.value for v in block.trainable_variables]
    fixed = [v.value for v in block.non_trainable_variables]

    def loss(trainable, x):
        out, _ = block.stateless_call(trainable, fixed, x)
        return jax.numpy.sum(out * out)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return collectives(step.lower(trainable, x).compile().as_text())


def run(name, weights):
    distribution = make_distribution(name)
    x, y, prompts = data()
    scope = (distribution.scope() if distribution is not None
             else contextlib.nullcontext())
    result = {}
    with scope:
        lm = NHACausalLM(NHABackbone(**CONFIG))
        lm.set_weights(weights)
        result["weights"] = {w.path: spec(w.value.sharding, len(w.shape))
                             for w in lm.weights}
        lm.compile(optimizer=keras.optimizers.SGD(0.05),
                   loss=keras.losses.SparseCategoricalCrossentropy(
                       from_logits=True),
                   weighted_metrics=[], sampler="greedy")
        with ShardingSpy() as spy:
            history = lm.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False,
                             verbose=0)
        result["fit_operation_inputs"] = spy.records
        result["train_step_collectives"] = collectives(
            dumped_hlo("train_step"))
        result["losses"] = [float(v) for v in history.history["loss"]]
        log(f"{name}: fit {result['losses']}")
        lm.set_weights(weights)
        with ShardingSpy() as spy:
            out = lm.generate(prompts, stop_token_ids=None)
        result["generate_operation_inputs"] = spy.records
        result["tokens"] = np.asarray(out["token_ids"]).tolist()
        log(f"{name}: generate")
        generate_hlo = dumped_hlo("generate")
        result["generate_collectives"] = collectives(generate_hlo)
        # The cache generate() builds: twice the buffer for global layers.
        cache = lm.get_initial_cache(BATCH, max_length=2 * GENERATE_LENGTH)
        result["initial_cache"] = {
            key: spec(value.sharding, value.ndim)
            for key, value in cache[0].items()}
        result["generate_cache_shapes"] = cache_shapes(cache, generate_hlo)
        if isinstance(distribution, keras.distribution.ModelParallel):
            try:
                NHABackbone(**dict(CONFIG, num_key_value_heads=2))
                result["uneven_heads_error"] = None
            except ValueError as error:
                result["uneven_heads_error"] = str(error)
            if name == "data_and_model":
                # The hybrid block (slots and window); the train step above
                # covers the global and the slots-only blocks too.
                block = lm.backbone.transformer_layers[0]
                result["block_collectives"] = block_hlo(block, distribution)
                log(f"{name}: block HLO")
    return result


def pallas_block(weights_seed=3):
    """A decoder block with `implementation="pallas"` (interpreted on CPU)
    on the 2 x 4 mesh against the portable path on one device."""
    distribution = make_distribution("data_and_model")
    config = dict(num_query_heads=8, num_key_value_heads=4,
                  intermediate_dim=16, window_size=3, num_slots=4)
    rng = np.random.default_rng(weights_seed)
    x = rng.normal(size=(4, 7, 16)).astype("float32")
    single = NHADecoderBlock(**config, implementation="chunked",
                             name="transformer_layer_0")
    single.build((None, None, 16))
    weights = [rng.normal(0, 0.3, w.shape).astype("float32") +
               (1.0 if "norm" in w.path else 0.0) for w in single.weights]
    single.set_weights(weights)

    def value_and_grads(block, x):
        trainable = [v.value for v in block.trainable_variables]

        def loss(trainable, x):
            out, _ = block.stateless_call(trainable, [], x)
            return jax.numpy.sum(out * out), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1),
                                          has_aux=True)), trainable

    step, trainable = value_and_grads(single, x)
    (_, expected), expected_grads = step(trainable, x)
    with distribution.scope(), ShardingSpy() as spy:
        block = NHADecoderBlock(**config, implementation="pallas",
                                name="transformer_layer_0")
        block.build((None, None, 16))
        block.set_weights(weights)
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec
        mesh = distribution.device_mesh.backend_mesh
        sharded_x = jax.device_put(
            x, NamedSharding(mesh, PartitionSpec("batch", None, None)))
        step, trainable = value_and_grads(block, sharded_x)
        compiled = step.lower(trainable, sharded_x).compile()
        (_, got), grads = compiled(trainable, sharded_x)
    error = float(np.abs(np.asarray(got) - expected).max() /
                  np.abs(expected).max())
    grad_error = max(
        float(np.abs(np.asarray(g) - np.asarray(e)).max() /
              max(np.abs(np.asarray(e)).max(), 1e-30))
        for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(
            expected_grads)))
    return {"output_error": error, "gradient_error": grad_error,
            "operation_inputs": spy.records,
            "collectives": collectives(compiled.as_text()),
            **pallas_decode(block, single, distribution)}


def pallas_decode(block, single, distribution, steps=5):
    """A few Pallas decode steps with a sharded cache against the portable
    step on one device: the largest relative output error and the
    collectives of one compiled step."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec

    mesh = distribution.device_mesh.backend_mesh
    rows = 4
    tokens = np.random.default_rng(4).normal(
        size=(steps, rows, 1, 16)).astype("float32")

    def step_fn(layer):
        trainable = [v.value for v in layer.trainable_variables]

        def step(trainable, x, cache):
            (out, cache), _ = layer.stateless_call(trainable, [], x,
                                                   cache=cache)
            return out, cache

        return jax.jit(step), trainable

    step, trainable = step_fn(single)
    cache, expected = single.get_initial_cache(rows), []
    for x in tokens:
        out, cache = step(trainable, x, cache)
        expected.append(np.asarray(out))
    with distribution.scope():
        cache = block.get_initial_cache(rows)
        layouts = NHABackbone.get_layout_map(distribution.device_mesh)
        for name, value in cache.items():
            layout = layouts[f"cache/{name}"]
            if layout is not None and len(layout.axes) == value.ndim:
                cache[name] = jax.device_put(value, NamedSharding(
                    mesh, PartitionSpec(*layout.axes)))
        batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
        step, trainable = step_fn(block)
        hlo = step.lower(trainable, jax.device_put(tokens[0], batch_sharding),
                         cache).compile().as_text()
        error = 0.0
        for x, want in zip(tokens, expected):
            out, cache = step(trainable, jax.device_put(x, batch_sharding),
                              cache)
            error = max(error, float(np.abs(np.asarray(out) - want).max()
                                     / np.abs(want).max()))
    return {"decode_step_collectives": collectives(hlo),
            "decode_error": error}


def readme_example():
    """Runs the code of README.md's "Training on several devices"."""
    readme = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          os.pardir, os.pardir, "README.md")
    if not os.path.exists(readme):
        return None
    section = open(readme).read().split("## Training on several devices")[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    kernel = namespace["backbone"].get_layer(
        "transformer_layer_0").attention.query_dense.kernel
    generated = np.asarray(namespace["generated"]["token_ids"])
    prompts = namespace["prompts"]
    return {"query_kernel": spec(kernel.value.sharding, 3),
            "generated_shape": list(generated.shape),
            "prompts_kept": bool((generated[:, :4] == prompts[:, :4]).all()),
            "in_vocabulary": bool(((generated >= 0) & (generated < 256))
                                  .all())}


def main(scenarios):
    results = {"length": LENGTH, "batch": BATCH, "config": CONFIG}
    weights = initial_weights()
    for name in scenarios:
        if name == "pallas":
            results["pallas"] = pallas_block()
            log("pallas block")
        elif name == "readme":
            results["readme"] = readme_example()
            log("README example")
        else:
            results[name] = run(name, weights)
    print("RESULT " + json.dumps(results), flush=True)
    shutil.rmtree(DUMP, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["single", "data", "model", "data_and_model",
                          "pallas"])
