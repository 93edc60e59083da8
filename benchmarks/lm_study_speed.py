"""Training throughput and decode latency of the LM-study variants.

Builds the four same-budget models of `benchmarks/lm_study.py` (NHA,
Transformer, GSA, sliding window; parameters matched within 1%), and for
each one measures:

- training: the first `train_on_batch` (trace + compile) separately, a few
  warmup steps, then the mean step time of `--steps` timed steps, as
  tokens/s (batch * sequence length / step time);
- decoding: ms per greedy token through `call_with_cache` with a cache sized
  for `--decode-context` tokens, and the cache's bytes per sequence.

Inputs are random byte ids (speed does not depend on the text). Every result
is appended to `--out` (JSON lines) as soon as it exists, so a run cut short
keeps what it measured.

    KERAS_BACKEND=jax python benchmarks/lm_study_speed.py --out speed.jsonl
"""

import argparse
import json
import os
import sys
import time
import traceback

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import lm_study  # noqa: E402
import lm_study_decode  # noqa: E402

from keras_nha.models import NHABackbone  # noqa: E402
from keras_nha.models import NHACausalLM  # noqa: E402
from keras_nha.models import NHATokenizer  # noqa: E402


def parse_args(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("--variants", default=",".join(lm_study.VARIANTS))
    parser.add_argument("--plan", default="train:auto,decode:auto",
                        help="comma-separated PHASE:KERNEL items, in order; "
                             "PHASE is train or decode, KERNEL an NHA "
                             "implementation (auto, chunked, pallas, ...)")
    parser.add_argument("--shapes", default=None,
                        help="training shapes BATCHxLENGTH, comma-separated "
                             "(default: --batch-size x --sequence-length)")
    parser.add_argument("--dtype-policy", default="float32",
                        help="e.g. mixed_bfloat16")
    common.add_options(parser, warmup=3, steps=20, decode_context=2048,
                       decode_steps=100)
    parser.add_argument("--decode-batch", type=int, default=1,
                        help="sequences decoded together")
    parser.add_argument("--decode-repeats", type=int, default=3,
                        help="timed runs of --decode-steps; the fastest "
                             "counts")
    parser.add_argument("--out", required=True, help="JSON lines output")
    parser.add_argument("--table", action="store_true",
                        help="only print the tables of the records in --out")
    args, rest = parser.parse_known_args(argv)
    # Model and batch flags are the training script's, with its defaults.
    model_args = lm_study.parse_args(rest)
    return args, model_args


def device_name():
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return f"jax on {device.platform} ({device.device_kind})"
    return f"{backend} on cpu"


def build(variant, model_args, implementation):
    vocabulary_size = NHATokenizer().vocabulary_size()
    kwargs, params, _ = lm_study.matched_kwargs(variant, model_args,
                                                vocabulary_size)
    keras.utils.set_random_seed(model_args.seed)
    backbone = NHABackbone(**kwargs, implementation=implementation)
    return NHACausalLM(backbone, preprocessor=None), kwargs, params


def time_training(lm, model_args, warmup, steps):
    """`(compile_s, mean_step_s)` of `train_on_batch` on random bytes."""
    rng = np.random.default_rng(model_args.seed)
    rows = rng.integers(3, 259, (model_args.batch_size,
                                 model_args.sequence_length + 1), "int32")
    x, y = lm_study.as_inputs(rows)
    lm_study.compile_lm(lm, model_args.steps, model_args.learning_rate)
    started = time.perf_counter()
    lm.train_on_batch(x, y)  # returns the loss: waits for the device
    compile_s = time.perf_counter() - started
    for _ in range(warmup):
        lm.train_on_batch(x, y)
    started = time.perf_counter()
    for _ in range(steps):
        loss = lm.train_on_batch(x, y)
    step_s = (time.perf_counter() - started) / steps
    if not np.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss}")
    return compile_s, step_s


def write(path, record):
    common.append_json_line(path, record)
    print(json.dumps(record), flush=True)


def run_one(phase, variant, args, model_args, implementation):
    lm, kwargs, params = build(variant, model_args, implementation)
    record = dict(phase=phase, variant=variant, parameters=params,
                  window_size=kwargs["window_size"],
                  num_slots=kwargs["num_slots"],
                  implementation=implementation,
                  dtype_policy=args.dtype_policy, device=device_name(),
                  backend=keras.config.backend(),
                  batch_size=model_args.batch_size,
                  sequence_length=model_args.sequence_length)
    if phase == "train":
        compile_s, step_s = time_training(lm, model_args, args.warmup,
                                          args.steps)
        tokens = model_args.batch_size * model_args.sequence_length
        record.update(compile_s=compile_s, step_ms=1000 * step_s,
                      tokens_per_s=tokens / step_s, timed_steps=args.steps)
    else:
        ms, compile_s = lm_study_decode.decode_ms_per_token(
            lm, args.decode_context, args.decode_steps,
            repeats=args.decode_repeats, batch_size=args.decode_batch)
        total, per_layer = lm_study_decode.cache_bytes(lm,
                                                       args.decode_context)
        record.update(compile_s=compile_s, ms_per_token=ms,
                      context=args.decode_context,
                      cache_bytes=total, cache_bytes_per_layer=per_layer,
                      essential_cache_bytes=lm_study_decode.
                      essential_cache_bytes(lm, args.decode_context),
                      batch_size=args.decode_batch)
    return record


def tables(path):
    """Markdown tables (training, decoding) of the records in `path`."""
    records = common.read_json_lines(path)
    train = ["| variant | kernel | policy | batch x T | compile s | ms/step | "
             "tokens/s |", "|---|---|---|---|---|---|---|"]
    decode = ["| variant | kernel | policy | batch | context | compile s | "
              "ms/step | tokens/s | cache KiB/seq | KV+slots KiB/seq |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        head = (f"| {r['variant']} | {r['implementation']} | "
                f"{r['dtype_policy']} |")
        if "error" in r:
            (train if r["phase"] == "train" else decode).append(
                f"{head} {r.get('batch_size', '?')} x "
                f"{r.get('sequence_length', '?')} | failed: "
                f"{r['error'][:80]} | | |")
        elif r["phase"] == "train":
            train.append(f"{head} {r['batch_size']} x {r['sequence_length']}"
                         f" | {r['compile_s']:.1f} | {r['step_ms']:.2f} | "
                         f"{r['tokens_per_s']:,.0f} |")
        else:
            decode.append(f"{head} {r['batch_size']} | {r['context']} | "
                          f"{r['compile_s']:.1f} | {r['ms_per_token']:.3f} | "
                          f"{1000 * r['batch_size'] / r['ms_per_token']:,.0f}"
                          " | "
                          f"{r['cache_bytes'] / 1024:.1f} | "
                          f"{r['essential_cache_bytes'] / 1024:.1f} |")
    device = records[0].get("device", "?") if records else "?"
    return f"device: {device}\n\n" + "\n".join(train) + "\n\n" + "\n".join(
        decode)


def measure(phase, variant, args, model_args, implementation):
    """Runs one measurement and appends its record (or its error)."""
    started = time.perf_counter()
    try:
        record = run_one(phase, variant, args, model_args, implementation)
    except Exception as error:  # keep measuring the others
        traceback.print_exc()
        record = dict(phase=phase, variant=variant,
                      implementation=implementation,
                      dtype_policy=args.dtype_policy,
                      batch_size=model_args.batch_size,
                      sequence_length=model_args.sequence_length,
                      error=f"{type(error).__name__}: {error}"[:500])
    record["wall_s"] = time.perf_counter() - started
    write(args.out, record)


def main(argv=None):
    args, model_args = parse_args(argv)
    if args.table:
        print(tables(args.out))
        return
    keras.config.set_dtype_policy(args.dtype_policy)
    print(f"device {device_name()}, backend {keras.config.backend()}, "
          f"policy {args.dtype_policy}, plan {args.plan}", flush=True)
    plan = [item.partition(":")[::2] for item in args.plan.split(",")]
    for phase, implementation in plan:
        if phase not in ("train", "decode") or not implementation:
            raise ValueError(f"--plan: expected PHASE:KERNEL items with "
                             f"PHASE train or decode, got {args.plan!r}.")
    shapes = [(model_args.batch_size, model_args.sequence_length)]
    if args.shapes:
        shapes = [tuple(int(n) for n in shape.split("x"))
                  for shape in args.shapes.split(",")]
    for phase, implementation in plan:
        for batch_size, length in shapes if phase == "train" else shapes[:1]:
            for variant in args.variants.split(","):
                measure(phase, variant, args, argparse.Namespace(**{
                    **vars(model_args), "batch_size": batch_size,
                    "sequence_length": length}), implementation)


if __name__ == "__main__":
    main()
