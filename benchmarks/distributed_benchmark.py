"""Training throughput of an NHA causal LM on one device vs several (JAX).

Trains `keras_nha.models.NHACausalLM` (`train_on_batch`) on synthetic tokens
under `keras.distribution`, one run per (implementation, mode):

- `single`: no distribution, one device;
- `data`: `keras.distribution.DataParallel` over `--devices` devices with the
  same per-device batch (so the global batch grows with the devices);
- `model`: `keras.distribution.ModelParallel` on a `(1, --devices)` mesh with
  `NHABackbone.get_layout_map` (heads split over the devices, one batch).

Each run compiles and warms up with `--warmup` steps, then times `--steps`
steps of `model.train_on_batch` (each returns its loss to the host, so each
timed call contains its whole step); the step time is their median. "peak GiB" is the largest
device memory in use so far in the process (JAX does not reset it between
runs), so only the first run of an invocation shows its own peak.
Prints one table row as soon as a run finishes (and appends it to `--json`),
then the data-parallel scaling against `single`.

    # GPU (both cards): the job script benchmarks/gpu/distributed.sh
    python3 benchmarks/distributed_benchmark.py --size h200 --json out.json
    # CPU smoke test on 8 host devices, tiny model:
    python benchmarks/distributed_benchmark.py --size tiny --host-devices 8 \\
        --devices 2
    # Replot from saved results:
    python benchmarks/distributed_benchmark.py --from-json out.json \\
        --plot out.png
"""

import gc
import os
import sys
import time

import common

SIZES = {
    # Fits a small CPU; for smoke tests only.
    "tiny": dict(model=dict(vocabulary_size=256, num_layers=2,
                            num_query_heads=4, num_key_value_heads=2,
                            hidden_dim=64, intermediate_dim=128,
                            window_size=16, num_slots=8),
                 batch_per_device=2, sequence_length=64),
    # About 0.16 B parameters; 32k tokens per device and step. Two wide
    # layers keep compile time low (the GPU job has 120 s in all).
    "h200": dict(model=dict(vocabulary_size=32768, num_layers=2,
                            num_query_heads=16, num_key_value_heads=8,
                            hidden_dim=2048, intermediate_dim=5632,
                            window_size=128, num_slots=64),
                 batch_per_device=16, sequence_length=2048),
}


def parse_args(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--runs", default="auto:single,auto:data,auto:model",
                        help="comma-separated implementation:mode pairs; "
                             "modes: single, data, model")
    parser.add_argument("--devices", type=int, default=2,
                        help="devices of the data and model runs")
    parser.add_argument("--host-devices", type=int, default=0,
                        help="CPU only: split the host into this many devices")
    parser.add_argument("--batch-per-device", type=int, default=0,
                        help="override the size's batch per device")
    parser.add_argument("--sequence-length", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10,
                        help="timed steps (the median is reported)")
    common.add_options(parser, warmup=2, dtype="mixed_bfloat16")
    parser.add_argument("--json", help="append one JSON line per run here")
    common.add_report_arguments(
        parser, plot_help="write a PNG of tokens/s per run",
        from_json_help="skip running; read these rows")
    return parser.parse_args(argv)


def _distribution(mode, devices):
    import keras

    from keras_nha.models import NHABackbone

    if mode == "single":
        return None
    if mode == "data":
        return keras.distribution.DataParallel(devices=devices)
    if mode == "model":
        mesh = keras.distribution.DeviceMesh((1, len(devices)),
                                             ("batch", "model"), devices)
        return keras.distribution.ModelParallel(
            layout_map=NHABackbone.get_layout_map(mesh),
            batch_dim_name="batch")
    raise ValueError(f"`--runs`: unknown mode {mode!r}; expected single, "
                     "data or model.")


def _build(size, implementation, dtype):
    import keras

    from keras_nha.models import NHABackbone, NHACausalLM

    keras.utils.set_random_seed(0)
    backbone = NHABackbone(**size["model"], implementation=implementation,
                           dtype=dtype)
    model = NHACausalLM(backbone)
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[])
    return model


def _peak_memory_gib(devices):
    peaks = []
    for device in devices:
        stats = getattr(device, "memory_stats", lambda: None)() or {}
        if "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"] / 2**30)
    return round(max(peaks), 2) if peaks else None


def run_one(size, implementation, mode, args):
    """Compiles, warms up and times one run; returns its result row."""
    import jax
    import keras
    import numpy as np

    all_devices = keras.distribution.list_devices()
    count = 1 if mode == "single" else args.devices
    if count > len(all_devices):
        raise ValueError(f"`--devices`: {count} requested, "
                         f"{len(all_devices)} available.")
    devices = all_devices[:count]
    jax_devices = jax.devices()[:count]
    replicas = count if mode == "data" else 1
    per_device = args.batch_per_device or size["batch_per_device"]
    length = args.sequence_length or size["sequence_length"]
    batch = per_device * replicas
    rng = np.random.default_rng(0)
    vocabulary = size["model"]["vocabulary_size"]

    def data(steps):
        ids = rng.integers(0, vocabulary, (steps * batch, length + 1),
                           dtype="int32")
        x = {"token_ids": ids[:, :-1],
             "padding_mask": np.ones((steps * batch, length), "int32")}
        return x, ids[:, 1:]

    distribution = _distribution(mode, devices)
    start = time.perf_counter()
    if distribution is None:
        model = _build(size, implementation, args.dtype)
    else:
        with distribution.scope():
            model = _build(size, implementation, args.dtype)
    parameters = model.count_params()
    print(f"  [{implementation}:{mode}] built {parameters / 1e6:.1f} M "
          f"parameters in {time.perf_counter() - start:.1f} s; compiling",
          flush=True)

    def train_step(x, y):
        # train_on_batch, not fit: keras-hub's fit() needs grain or
        # TensorFlow to batch arrays, and the GPU machine has neither.
        # It returns the loss as a host value, so each call waits for its
        # step.
        if distribution is None:
            return model.train_on_batch(x, y)
        with distribution.scope():
            return model.train_on_batch(x, y)

    batches = [data(1) for _ in range(args.warmup + args.steps)]
    start = time.perf_counter()
    for x, y in batches[:args.warmup]:
        train_step(x, y)
    warmup_s = time.perf_counter() - start
    print(f"  [{implementation}:{mode}] compile + {args.warmup} warmup steps "
          f"{warmup_s:.1f} s; timing {args.steps} steps", flush=True)
    times = []
    for x, y in batches[args.warmup:]:
        start = time.perf_counter()
        loss = train_step(x, y)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    tokens = batch * length
    row = dict(
        implementation=implementation, mode=mode, devices=count,
        device_kind=jax_devices[0].device_kind, global_batch=batch,
        sequence_length=length, parameters=parameters,
        step_ms=round(1000 * step_s, 2),
        tokens_per_s=round(tokens / step_s, 1),
        warmup_s=round(warmup_s, 1), loss=float(np.asarray(loss).ravel()[0]),
        peak_gib=_peak_memory_gib(jax_devices), backend=jax.default_backend())
    del model
    keras.backend.clear_session()
    gc.collect()
    return row


HEADER = (f"{'implementation':<14} {'mode':<7} {'dev':>3} {'batch':>5} "
          f"{'T':>5} {'step ms':>9} {'tokens/s':>11} {'vs 1':>6} "
          f"{'compile s':>9} {'peak GiB':>8} {'loss':>7}  card")


def format_row(row, baseline):
    ratio = (f"{row['tokens_per_s'] / baseline:.2f}x" if baseline else "-")
    peak = "-" if row.get("peak_gib") is None else f"{row['peak_gib']:.1f}"
    return (f"{row['implementation']:<14} {row['mode']:<7} "
            f"{row['devices']:>3} {row['global_batch']:>5} "
            f"{row['sequence_length']:>5} {row['step_ms']:>9.1f} "
            f"{row['tokens_per_s']:>11.0f} {ratio:>6} "
            f"{row['warmup_s']:>9.1f} {peak:>8} {row['loss']:>7.3f}  "
            f"{row['device_kind']}")


def _baseline(rows, implementation):
    for row in rows:
        if row["implementation"] == implementation and row["mode"] == "single":
            return row["tokens_per_s"]
    return None


def plot(rows, path):
    plt = common.pyplot()
    labels = [f"{r['implementation']}\n{r['mode']} x{r['devices']}"
              for r in rows]
    values = [r["tokens_per_s"] / 1e3 for r in rows]
    width = max(6.5, 1.6 + 1.3 * len(rows))
    figure, axis = plt.subplots(figsize=(width, 4))
    bars = axis.bar(labels, values, color=[
        {"single": "tab:gray", "data": "tab:blue", "model": "tab:orange"}
        .get(r["mode"], "tab:green") for r in rows])
    for bar, row in zip(bars, rows):
        baseline = _baseline(rows, row["implementation"])
        if baseline and row["mode"] != "single":
            axis.annotate(f"{row['tokens_per_s'] / baseline:.2f}x",
                          (bar.get_x() + bar.get_width() / 2,
                           bar.get_height()), ha="center", va="bottom")
    axis.set_ylabel("training throughput (k tokens/s)")
    card = rows[0]["device_kind"] if rows else ""
    axis.set_title(f"NHACausalLM training, {rows[0]['parameters'] / 1e6:.1f} M "
                   f"params, T={rows[0]['sequence_length']}, {card}"
                   if rows else "no rows", fontsize=10)
    common.save_figure(figure, path)


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        rows = common.read_json_lines(args.from_json)
    else:
        if args.host_devices:
            os.environ["XLA_FLAGS"] = (
                os.environ.get("XLA_FLAGS", "") +
                f" --xla_force_host_platform_device_count={args.host_devices}")
        os.environ.setdefault("KERAS_BACKEND", "jax")
        import keras

        if keras.config.backend() != "jax":
            sys.exit("keras.distribution training needs KERAS_BACKEND=jax.")
        size = SIZES[args.size]
        import jax

        print(f"jax {jax.__version__}, keras {keras.__version__}")
        print(f"size {args.size}: {size}; warmup {args.warmup}, timed "
              f"{args.steps} steps; devices "
              f"{keras.distribution.list_devices()}", flush=True)
        # Rows of earlier invocations in the same file count as baselines.
        rows = (common.read_json_lines(args.json)
                if args.json and os.path.exists(args.json) else [])
        for spec in args.runs.split(","):
            implementation, _, mode = spec.strip().partition(":")
            try:
                row = run_one(size, implementation, mode, args)
            except Exception as error:  # report and go on with the next run
                print(f"  [{spec}] FAILED: {type(error).__name__}: "
                      f"{str(error)[:2000]}", flush=True)
                keras.backend.clear_session()
                gc.collect()
                continue
            rows.append(row)
            print(HEADER)
            print(format_row(row, _baseline(rows, implementation)), flush=True)
            if args.json:
                common.append_json_line(args.json, row)
    print()
    print(HEADER)
    for row in rows:
        print(format_row(row, _baseline(rows, row["implementation"])))
    if args.plot and rows:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
