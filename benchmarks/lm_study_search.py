"""Inference-time window search on a trained LM-study model (no retraining).

Windows are not weights: the NHA model trained by `benchmarks/lm_study.py`
is rebuilt with other per-layer windows (`None` = a global layer, `0` = slots
only) and the trained weights. For each schedule this tabulates the
validation loss (at the training length and at longer contexts), the greedy
decode time per token and the generation cache's bytes per sequence, and
plots loss against cache size and against decode time.

    KERAS_BACKEND=tensorflow nice -n 5 python benchmarks/lm_study_search.py \
        --out /tmp/lm_study --plot docs/images/lm_window_search.png
"""

import argparse
import math
import os
import sys
import time

import keras
from keras import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import lm_study  # noqa: E402
import lm_study_decode  # noqa: E402
import lm_study_speed  # noqa: E402

from keras_nha.models import NHABackbone  # noqa: E402
from keras_nha.models import NHACausalLM  # noqa: E402

# Per-layer windows of a 2-layer model; the trained NHA model has [64, 64].
DEFAULT_SCHEDULES = (
    "64,64 0,0 8,8 16,16 32,32 128,128 g,g "
    "g,0 0,g g,16 16,g g,64 64,g 64,0 0,64")


def schedule_name(windows):
    return "[" + ", ".join("g" if w is None else str(w) for w in windows) + "]"


def per_layer_windows(backbone_kwargs):
    windows = backbone_kwargs["window_size"]
    if not isinstance(windows, list):
        windows = [windows] * backbone_kwargs["num_layers"]
    return windows


def parse_args(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("--out", required=True,
                        help="the training run's folder (results.json, "
                             "weights); results_search_VARIANT.json is "
                             "written here")
    parser.add_argument("--variant", default="nha",
                        help="which trained model to search")
    parser.add_argument("--results", default=None,
                        help="training results JSON (default OUT/results.json)")
    parser.add_argument("--weights", default=None,
                        help="weights file (default OUT/VARIANT.weights.h5)")
    parser.add_argument("--schedules", default=DEFAULT_SCHEDULES,
                        help="space-separated per-layer windows, g = global")
    parser.add_argument("--lengths", default="256,1024",
                        help="validation context lengths")
    parser.add_argument("--validation-bytes", type=int, default=65536,
                        help="validation text per length (same bytes)")
    parser.add_argument("--decode-context", type=int, default=1024)
    parser.add_argument("--decode-steps", type=int, default=50)
    parser.add_argument("--decode-repeats", type=int, default=10,
                        help="timed runs of --decode-steps; the fastest "
                             "counts (others share this machine)")
    common.add_report_arguments(
        parser, plot_help="loss against cache size and decode time, PNG",
        from_json_help="only redraw the plot and table from this JSON")
    return parser.parse_args(argv)


def validation_rows(train_args, length, total_bytes):
    """Validation rows of `length + 1` ids covering the same first bytes."""
    train_args = argparse.Namespace(**{**train_args,
                                       "sequence_length": length})
    *_, valid_rows, _ = lm_study.load_data(train_args)
    return valid_rows[:max(1, total_bytes // length)]


def evaluate(lm, rows, batch_size):
    """Mean next-byte cross entropy (nats) over `rows`.

    A compiled forward pass per batch rather than `lm.evaluate()`: on
    TensorFlow, `evaluate()` traces the model with an unknown time axis,
    which the NHA op cannot size its state from.
    """
    @lm_study_decode.compiled
    def batch_loss(x, y):
        logits = lm(x)
        return ops.sum(keras.losses.sparse_categorical_crossentropy(
            y, logits, from_logits=True))

    total = 0.0
    for start in range(0, len(rows), batch_size):
        x, y = lm_study.as_inputs(rows[start:start + batch_size])
        total += float(batch_loss(x, y))
    return total / rows[:, 1:].size


def table(saved):
    """The search's table: loss per context, decode time, cache sizes."""
    records, lengths = saved["records"], saved["lengths"]
    head = f"{'windows':12s} " + " ".join(
        f"{'loss@' + str(t):>9s}" for t in lengths) + (
        f" {'ms/token':>9s} {'cache KiB':>10s} {'KV+slots KiB':>12s}")
    lines = [head]
    for r in records:
        lines.append(f"{r['schedule']:12s} " + " ".join(
            f"{r['valid_loss'][str(t)]:9.4f}" for t in lengths) +
            f" {r['ms_per_token']:9.3f} {r['cache_bytes'] / 1024:10.1f}"
            f" {r.get('essential_cache_bytes', float('nan')) / 1024:12.1f}")
    return "\n".join(lines)


def plot(path, saved):
    """Loss against cache size and against decode time, per schedule."""
    plt = common.pyplot()
    records, lengths = saved["records"], saved["lengths"]
    length = str(lengths[-1])
    losses = sorted(r["valid_loss"][length] for r in records)
    # Schedules far off (e.g. no window at all) would squash the rest: they
    # are drawn as triangles on the top edge with their loss written out.
    top = min(losses[-1], losses[0] + 3 * (losses[len(losses) // 2]
                                           - losses[0]) + 0.05)
    figure, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for axis, key, label in (
            (axes[0], "cache_bytes", f"generation cache (KiB per sequence, "
                                     f"context {saved['decode_context']})"),
            (axes[1], "ms_per_token", "greedy decode (ms / token, batch 1, "
                                      f"{saved['device']})")):
        for i, r in enumerate(records):
            x = r[key] / (1024 if key == "cache_bytes" else 1)
            y = r["valid_loss"][length]
            trained = r["schedule"] == saved["trained_schedule"]
            text = r["schedule"]
            if y > top:
                marker, text, y = "^", f"{text}: {y:.2f}", top
            else:
                marker = "*" if trained else "o"
            axis.plot(x, y, marker, color="C3" if trained else "C0",
                      ms=12 if trained else 6, clip_on=False)
            axis.annotate(text, (x, y), fontsize=7,
                          xytext=(4, -10 if i % 2 else 4),
                          textcoords="offset points")
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
        if key == "cache_bytes":
            axis.set_xscale("log")
    axes[0].set_ylim(losses[0] - 0.01, top)
    axes[0].set_ylabel(f"validation loss at context {length} (nats/byte)")
    figure.suptitle(
        f"{saved['variant']} model trained with windows "
        f"{saved['trained_schedule']}, rerun with other per-layer windows "
        "(g = global), no retraining; star = as trained", fontsize=10)
    common.save_figure(figure, path, announce=False)


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        return common.report_saved(args.from_json, table, plot, args.plot)
    os.makedirs(args.out, exist_ok=True)
    training = common.read_json(
        args.results or os.path.join(args.out, "results.json"))
    trained = {r["variant"]: r for r in training["records"]}
    train_args = training["args"]
    base = trained[args.variant]["backbone"]
    lengths = [int(t) for t in args.lengths.split(",") if t]
    rows = {t: validation_rows(train_args, t, args.validation_bytes)
            for t in lengths}
    reference = NHACausalLM(NHABackbone(**base), preprocessor=None)
    reference.load_weights(args.weights or os.path.join(
        args.out, f"{args.variant}.weights.h5"))
    weights = reference.get_weights()
    saved = dict(variant=args.variant, backend=keras.config.backend(),
                 device=lm_study_speed.device_name(),
                 trained_schedule=schedule_name(
                     per_layer_windows(base)),
                 lengths=lengths, decode_context=args.decode_context,
                 validation_bytes=args.validation_bytes, records=[])
    path = os.path.join(args.out, f"results_search_{args.variant}.json")
    for text in args.schedules.split():
        windows = lm_study.parse_windows(text, base["num_layers"],
                                         argument="--schedules")
        started = time.perf_counter()
        lm = NHACausalLM(NHABackbone(**{**base, "window_size": windows}),
                         preprocessor=None)
        lm.set_weights(weights)
        losses = {str(t): evaluate(lm, rows[t], max(1, 4096 // t))
                  for t in lengths}
        ms, compile_s = lm_study_decode.decode_ms_per_token(
            lm, args.decode_context, args.decode_steps,
            repeats=args.decode_repeats)
        total, per_layer = lm_study_decode.cache_bytes(lm,
                                                       args.decode_context)
        record = dict(schedule=schedule_name(windows), windows=windows,
                      valid_loss=losses,
                      perplexity={t: math.exp(v) for t, v in losses.items()},
                      ms_per_token=ms, decode_compile_s=compile_s,
                      cache_bytes=total, cache_bytes_per_layer=per_layer,
                      essential_cache_bytes=lm_study_decode.
                      essential_cache_bytes(lm, args.decode_context),
                      wall_s=time.perf_counter() - started)
        saved["records"].append(record)
        print(f"{record['schedule']:12s} loss " + " ".join(
            f"@{t} {v:.4f}" for t, v in losses.items()) +
            f"; {ms:.3f} ms/token; cache {total / 1024:.1f} KiB; "
            f"{record['wall_s']:.0f} s", flush=True)
        common.write_json(path, saved)
        if args.plot:
            plot(args.plot, saved)
    print(table(saved))
    return saved


if __name__ == "__main__":
    main()
