"""Same-budget language-modelling study: NHA vs Transformer vs GSA vs SWA.

Trains four byte-level causal LMs on the corpus of
`examples/train_causal_lm.py` (the Python standard library's source, so
nothing is downloaded) with the same parameter count (within 1%), tokens,
steps, seed and optimizer. The variants differ only in what one
`NHALayer` attends to:

- `nha`: M slots + a window of W tokens (the example's model),
- `transformer`: no slots, global window (full causal attention),
- `gsa`: M slots, no window (gated slot attention),
- `swa`: no slots, a window of `--swa-window` tokens.

The variants without slots lack the gate projection; their feed-forward
width grows to keep the parameter count equal. Prints progress, a table of
validation loss, perplexity, bits per byte and training tokens/s, writes a
JSON record, the training curves (`--plot`) and each model's weights (for
`lm_study_search.py`). Training rows are shuffled once with the seed
(`--order corpus` keeps the example's file order, which drifts: the last
steps see other files than the first). `lm_study_seeds.py` summarises
several seeds.

    KERAS_BACKEND=tensorflow nice -n 5 python benchmarks/lm_study.py \
        --seed 0 --out /tmp/lm_study/seed0 --plot /tmp/lm_study/seed0.png

trains the four models in about 5 minutes on a quiet 2-core CPU.
`--window-size 64,g` gives the NHA model per-layer windows (g = global).
"""

import math
import os
import sys
import time

import common
import keras
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "examples"))
import train_causal_lm as example  # noqa: E402

from keras_nha.models import NHABackbone  # noqa: E402
from keras_nha.models import NHACausalLM  # noqa: E402
from keras_nha.models import NHATokenizer  # noqa: E402

VARIANTS = ("nha", "transformer", "gsa", "swa")
LABELS = {
    "nha": "NHA (slots + window)",
    "transformer": "Transformer (global)",
    "gsa": "GSA (slots only)",
    "swa": "Sliding window",
}


def parse_args(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {VARIANTS}")
    common.add_options(parser, max_bytes=3_000_000, validation_fraction=0.05)
    parser.add_argument("--validation-rows", type=int, default=256,
                        help="validation sequences (the same for everyone)")
    common.add_options(parser, num_layers=2, hidden_dim=128, num_heads=4,
                       num_kv_heads=2, intermediate_dim=256)
    parser.add_argument("--window-size", default="64",
                        help="NHA window: an int, or per-layer windows "
                             "separated by commas with g for a global layer "
                             "(e.g. 64,g)")
    common.add_options(parser, num_slots=16, swa_window=64,
                       sequence_length=256, batch_size=16, steps=500,
                       eval_every=100, learning_rate=3e-3, seed=0)
    parser.add_argument("--order", choices=("shuffled", "corpus"),
                        default="shuffled",
                        help="training rows shuffled once with --seed, or in "
                             "corpus order (files alphabetically, as "
                             "examples/train_causal_lm.py feeds them)")
    parser.add_argument("--out", default="lm_study_out",
                        help="folder for results.json, log lines and weights")
    parser.add_argument("--no-weights", action="store_true",
                        help="do not save the trained weights")
    common.add_report_arguments(
        parser, plot_help="training curves PNG",
        from_json_help="only redraw the plot and table from this JSON")
    return parser.parse_args(argv)


def parse_windows(text, num_layers, argument="--window-size"):
    """"64,g" -> [64, None] (g = global): one window per layer.

    Raises a ValueError naming `argument` for anything else.
    """
    windows = []
    for item in str(text).split(","):
        if item in ("g", "global"):
            windows.append(None)
        elif item.isdigit():
            windows.append(int(item))
        else:
            raise ValueError(f"{argument}: expected ints or 'g' separated "
                             f"by commas, got {text!r}.")
    if len(windows) != num_layers:
        raise ValueError(f"{argument}: {text!r} gives {len(windows)} "
                         f"windows for {num_layers} layers.")
    return windows


def nha_windows(text, num_layers):
    """"64" -> 64 (every layer); "64,g" -> [64, None] (g = global)."""
    if "," not in str(text):
        return parse_windows(text, 1)[0]
    return parse_windows(text, num_layers)


def backbone_kwargs(variant, args, vocabulary_size, intermediate_dim=None):
    """NHABackbone arguments of one variant (window None = global)."""
    if variant not in VARIANTS:
        raise ValueError(f"`variant`: expected one of {VARIANTS}, got "
                         f"{variant!r}.")
    window, slots = {
        "nha": (nha_windows(args.window_size, args.num_layers),
                args.num_slots),
        "transformer": (None, 0),
        "gsa": (0, args.num_slots),
        "swa": (args.swa_window, 0),
    }[variant]
    return dict(vocabulary_size=vocabulary_size, num_layers=args.num_layers,
                num_query_heads=args.num_heads,
                num_key_value_heads=args.num_kv_heads,
                hidden_dim=args.hidden_dim,
                intermediate_dim=intermediate_dim or args.intermediate_dim,
                window_size=window, num_slots=slots)


def matched_kwargs(variant, args, vocabulary_size):
    """Backbone arguments with the feed-forward width that matches NHA's
    parameter count (the variants without slots have no gate projection).

    Returns:
        `(kwargs, parameters, reference_parameters)`.
    """
    def count(kwargs):
        return NHABackbone(**kwargs).count_params()

    reference = count(backbone_kwargs("nha", args, vocabulary_size))
    kwargs = backbone_kwargs(variant, args, vocabulary_size)
    params = count(kwargs)
    # One feed-forward unit costs 3 * hidden_dim weights per layer.
    per_unit = 3 * args.hidden_dim * args.num_layers
    extra = round((reference - params) / per_unit)
    if extra:
        kwargs = backbone_kwargs(variant, args, vocabulary_size,
                                 args.intermediate_dim + extra)
        params = count(kwargs)
    return kwargs, params, reference


def load_data(args):
    """The tokenizer, byte ids, rows `[N, T + 1]` (training, validation)
    and the unigram baseline (nats/byte), as the example makes them."""
    tokenizer = NHATokenizer()
    documents = example.read_corpus(None, "**/*.py", args.max_bytes)
    return (tokenizer,) + example.byte_rows(
        documents, tokenizer, args.validation_fraction, args.sequence_length)


def as_inputs(rows):
    x = {"token_ids": rows[:, :-1], "padding_mask": np.ones_like(rows[:, :-1])}
    return x, rows[:, 1:]


def compile_lm(lm, steps, learning_rate):
    """The example's optimizer: AdamW, warmup then cosine decay, clipping."""
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=steps, warmup_target=learning_rate,
        warmup_steps=max(1, steps // 20), alpha=0.1)
    lm.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01,
                                                clipnorm=1.0),
               weighted_metrics=[])


class StepClock(example.BatchLoss):
    """The example's per-step losses, plus step wall times and a progress
    line every `every` steps."""

    def __init__(self, tokens_per_step, total_steps, every=25):
        super().__init__()
        self.tokens_per_step = tokens_per_step
        self.total_steps = total_steps
        self.every = every
        self.intervals = []
        self.first_step_s = None
        self._last = None

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._last = None

    def on_train_batch_begin(self, batch, logs=None):
        if self.first_step_s is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self.first_step_s is None:
            self.first_step_s = now - self._start
        elif self._last is not None:
            # Within an epoch only: epoch ends add validation time.
            self.intervals.append(now - self._last)
        self._last = now
        super().on_train_batch_end(batch, logs)
        step = len(self.losses)
        if step % self.every == 0 or step == self.total_steps:
            recent = self.intervals[-self.every:] or [float("nan")]
            print(f"  step {step:4d}/{self.total_steps}  loss "
                  f"{np.mean(self.losses[-self.every:]):.3f}  "
                  f"{1000 * np.median(recent):.0f} ms/step", flush=True)


def train_variant(variant, args, data):
    tokenizer, _, _, train_rows, valid_rows, baseline = data
    kwargs, params, reference = matched_kwargs(
        variant, args, tokenizer.vocabulary_size())
    keras.utils.set_random_seed(args.seed)
    backbone = NHABackbone(**kwargs)
    lm = NHACausalLM(backbone, preprocessor=None)
    compile_lm(lm, args.steps, args.learning_rate)
    change = 100 * (params / reference - 1)
    print(f"[{variant}] {params:,} parameters ({change:+.2f}% vs NHA), "
          f"window {kwargs['window_size']}, {kwargs['num_slots']} "
          f"slots, intermediate {kwargs['intermediate_dim']}, backend "
          f"{keras.config.backend()}", flush=True)
    if args.order == "shuffled":
        train_rows = np.random.default_rng(args.seed).permutation(train_rows)
    x, y = as_inputs(train_rows)
    validation = as_inputs(valid_rows[:args.validation_rows])
    tokens_per_step = args.batch_size * args.sequence_length
    clock = StepClock(tokens_per_step, args.steps)
    started = time.perf_counter()
    history = lm.fit(x, y, batch_size=args.batch_size,
                     epochs=math.ceil(args.steps / args.eval_every),
                     steps_per_epoch=args.eval_every,
                     validation_data=validation, callbacks=[clock],
                     verbose=0)
    wall = time.perf_counter() - started
    valid_losses = [float(v) for v in history.history["val_loss"]]
    step_s = float(np.median(clock.intervals))
    record = dict(
        variant=variant, label=LABELS[variant], parameters=params,
        backbone=kwargs, valid_loss=valid_losses[-1],
        perplexity=math.exp(valid_losses[-1]),
        bits_per_byte=valid_losses[-1] / math.log(2),
        valid_curve=valid_losses,
        valid_steps=[args.eval_every * (i + 1)
                     for i in range(len(valid_losses))],
        train_losses=clock.losses, first_step_s=clock.first_step_s,
        median_step_s=step_s, tokens_per_s=tokens_per_step / step_s,
        wall_s=wall, unigram_baseline=baseline)
    print(f"[{variant}] validation {record['valid_loss']:.4f} nats/byte, "
          f"ppl {record['perplexity']:.3f}, {record['bits_per_byte']:.3f} "
          f"bits/byte; {record['tokens_per_s']:,.0f} tokens/s; first step "
          f"(compile) {clock.first_step_s:.1f} s; wall {wall:.0f} s",
          flush=True)
    if not args.no_weights:
        lm.save_weights(os.path.join(args.out, f"{variant}.weights.h5"))
    return record


def table(saved):
    """The results table of a saved run (one row per variant)."""
    records = saved["records"]
    lines = [f"{'variant':24s} {'params':>8s} {'val loss':>9s} {'ppl':>7s} "
             f"{'bits/B':>7s} {'tok/s':>8s} {'compile s':>9s} {'wall s':>7s}"]
    for r in records:
        lines.append(
            f"{r['label']:24s} {r['parameters']:8,d} {r['valid_loss']:9.4f} "
            f"{r['perplexity']:7.3f} {r['bits_per_byte']:7.3f} "
            f"{r['tokens_per_s']:8,.0f} {r['first_step_s']:9.1f} "
            f"{r['wall_s']:7.0f}")
    return "\n".join(lines)


def plot(path, saved):
    """Training curves (20-step means) and validation points per variant."""
    records, title = saved["records"], saved["title"]
    plt = common.pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for i, r in enumerate(records):
        losses = np.asarray(r["train_losses"])
        width = min(20, len(losses))
        smooth = np.convolve(losses, np.ones(width) / width, mode="valid")
        steps = np.arange(width, len(losses) + 1)
        axis.plot(steps, smooth, color=f"C{i}", lw=1.2,
                  label=f"{r['label']} (train, 20-step mean)")
        axis.plot(r["valid_steps"], r["valid_curve"], "o--", color=f"C{i}",
                  ms=4, lw=0.8)
    axis.axhline(records[0]["unigram_baseline"], color="gray", ls=":",
                 label="unigram baseline")
    axis.set_ylim(top=min(3.3, axis.get_ylim()[1]))
    axis.set_xlabel("training step")
    axis.set_ylabel("loss (nats / byte)")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8, title="dashed circles: validation",
                title_fontsize=8)
    axis.grid(alpha=0.3)
    common.save_figure(figure, path, announce=False)


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        return common.report_saved(args.from_json, table, plot, args.plot)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"--variants: unknown variant {v!r}; expected "
                             f"some of {VARIANTS}.")
    os.makedirs(args.out, exist_ok=True)
    data = load_data(args)
    title = (f"byte LM on Python stdlib, {args.num_layers} layers, d "
             f"{args.hidden_dim}, T {args.sequence_length}, batch "
             f"{args.batch_size}, {args.steps} steps, {args.order} rows, "
             f"seed {args.seed} ({keras.config.backend()})")
    records, path = [], os.path.join(args.out, "results.json")
    for variant in variants:
        records.append(train_variant(variant, args, data))
        saved = dict(title=title, args=vars(args),
                     python=sys.version.split()[0], records=records)
        common.write_json(path, saved)
        print(table(saved), flush=True)
        if args.plot:
            plot(args.plot, saved)
    return saved


if __name__ == "__main__":
    main()
