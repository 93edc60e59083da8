"""Distributed `generate()` of an NHA causal LM (JAX): tokens and speed.

Builds one `NHACausalLM` (random weights; a hybrid layer, a global layer, a
hybrid layer and a slots-only layer) and runs greedy `generate()` on the same
prompts three ways:

- `single`: no distribution, one device;
- `data`: `keras.distribution.DataParallel` over `--devices` devices;
- `model`: `keras.distribution.ModelParallel` on a `(1, --devices)` mesh with
  `NHABackbone.get_layout_map` (heads, and the decode cache, split).

For each it prints the generated tokens' agreement with `single`, the
decode throughput (the second call, after compilation), and the largest
all-gather in the compiled generate function (read from XLA's HLO dump): a
gathered cache or activation shows up there as a large array.

    # GPU (two cards): part of benchmarks/gpu/distributed.sh
    python3 benchmarks/distributed_generate.py --devices 2 --json out.jsonl
    # CPU smoke test on 4 host devices:
    python benchmarks/distributed_generate.py --host-devices 4 --devices 2 \\
        --size tiny
"""

import argparse
import glob
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

SIZES = {
    "tiny": dict(vocabulary_size=256, num_layers=4, num_query_heads=4,
                 num_key_value_heads=2, hidden_dim=64, intermediate_dim=128,
                 window_size=[8, None, 8, 0], num_slots=[4, 0, 4, 8]),
    "gpu": dict(vocabulary_size=32768, num_layers=4, num_query_heads=16,
                num_key_value_heads=8, hidden_dim=2048,
                intermediate_dim=5632, window_size=[256, None, 256, 0],
                num_slots=[64, 0, 64, 64]),
}
ALL_GATHER = re.compile(r"=\s*(.*?)\sall-gather(-start)?\(")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="gpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--host-devices", type=int, default=0,
                        help="CPU only: fake this many host devices")
    parser.add_argument("--implementation", default="auto")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=192)
    parser.add_argument("--json", help="append one JSON line per run")
    args = parser.parse_args(argv)
    for name in ("devices", "batch", "prompt_length", "new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def largest_all_gather(hlo):
    """Elements of the largest array any all-gather produces (0: none)."""
    largest = 0
    for line in hlo.splitlines():
        match = ALL_GATHER.search(line)
        if match:
            for dims in re.findall(r"\[([\d,]*)\]", match.group(1)):
                size = math.prod(int(d) for d in dims.split(",") if d)
                largest = max(largest, size)
    return largest


def compiled_generate_hlo(dump):
    files = [f for f in glob.glob(os.path.join(
        dump, "*generate*after_optimizations.txt"))
        if "buffer-assignment" not in f]
    return "".join(open(f).read() for f in files)


def run(mode, args, weights, prompts, dump):
    import keras

    from keras_nha.models import NHABackbone
    from keras_nha.models import NHACausalLM

    devices = keras.distribution.list_devices()[:args.devices]
    if mode == "data":
        distribution = keras.distribution.DataParallel(devices=devices)
    elif mode == "model":
        mesh = keras.distribution.DeviceMesh((1, len(devices)),
                                             ("batch", "model"), devices)
        distribution = keras.distribution.ModelParallel(
            layout_map=NHABackbone.get_layout_map(mesh),
            batch_dim_name="batch")
    else:
        distribution = None
    shutil.rmtree(dump, ignore_errors=True)
    keras.distribution.set_distribution(distribution)
    try:
        model = NHACausalLM(NHABackbone(**SIZES[args.size],
                                        implementation=args.implementation))
        if weights is not None:
            model.set_weights(weights)
        model.compile(sampler="greedy")
        start = time.perf_counter()
        model.generate(prompts, stop_token_ids=None)
        first = time.perf_counter() - start
        start = time.perf_counter()
        tokens = model.generate(prompts, stop_token_ids=None)["token_ids"]
        seconds = time.perf_counter() - start
        weights = model.get_weights() if weights is None else weights
    finally:
        keras.distribution.set_distribution(None)
    hlo = compiled_generate_hlo(dump)
    return weights, tokens, {
        "mode": mode, "devices": 1 if mode == "single" else args.devices,
        "implementation": args.implementation, "size": args.size,
        "first_call_s": round(first, 2), "generate_s": round(seconds, 4),
        "tokens_per_s": round(args.batch * args.new_tokens / seconds),
        "largest_all_gather": largest_all_gather(hlo),
        "hlo_found": bool(hlo)}


def main(argv=None):
    args = parse_args(argv)
    dump = tempfile.mkdtemp(prefix="nha_generate_hlo_")
    flags = [os.environ.get("XLA_FLAGS", ""), f"--xla_dump_to={dump}",
             "--xla_dump_hlo_as_text", "--xla_dump_hlo_module_re=.*generate.*"]
    if args.host_devices:
        flags.append(
            f"--xla_force_host_platform_device_count={args.host_devices}")
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras
    import numpy as np

    if keras.config.backend() != "jax":
        sys.exit("keras.distribution needs KERAS_BACKEND=jax.")
    available = len(keras.distribution.list_devices())
    if available < args.devices:
        sys.exit(f"--devices {args.devices}: only {available} visible.")
    keras.utils.set_random_seed(0)
    size = SIZES[args.size]
    total = args.prompt_length + args.new_tokens
    rng = np.random.default_rng(0)
    prompts = {
        "token_ids": np.zeros((args.batch, total), "int32"),
        "padding_mask": np.zeros((args.batch, total), bool)}
    prompts["token_ids"][:, :args.prompt_length] = rng.integers(
        1, size["vocabulary_size"], (args.batch, args.prompt_length))
    prompts["padding_mask"][:, :args.prompt_length] = True
    print(f"{'mode':>7} {'devices':>7} {'tokens/s':>10} {'first call s':>12} "
          f"{'same tokens':>11} {'largest all-gather':>18}", flush=True)
    weights = reference = None
    for mode in ("single", "data", "model"):
        weights, tokens, row = run(mode, args, weights, prompts, dump)
        tokens = np.asarray(tokens)[:, args.prompt_length:]
        reference = tokens if reference is None else reference
        row["same_tokens"] = float((tokens == reference).mean())
        print(f"{mode:>7} {row['devices']:>7} {row['tokens_per_s']:>10} "
              f"{row['first_call_s']:>12} {row['same_tokens']:>11.3f} "
              f"{row['largest_all_gather']:>18}", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
