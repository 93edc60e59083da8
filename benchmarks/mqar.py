r"""Multi-query associative recall (MQAR) with NHA, GSA, sliding window, full
attention and a GSA/global hybrid, all built from `keras_nha`.

Trains the same two-layer model (d_model 128) in each setting on MQAR batches
generated on the fly (`mqar_data.py`), on JAX with one jitted step that trains
all runs of a setting (pair counts x seeds x learning rates) at once under
`jax.vmap`, so one compilation serves them all and a GPU gets more than one
tiny model's work. With `--mixture` a run trains on all `--pairs` at once and
is tested at each. Every finished run and tested pair count is one JSON line
in `--output`.

    # train (JAX backend), session 3's recipe
    KERAS_BACKEND=jax python benchmarks/mqar.py --settings nha-M16-W16 \
        --seq-len 256 --vocab 512 --pairs 8 16 32 64 --mixture \
        --placement power --short-conv 3 --weight-decay 0.1 --seeds 0 1 \
        --lr 1e-3 3e-3 --steps 3000 --warmup 75 --output mqar.jsonl
    # table and figure from one or more result files
    python benchmarks/mqar.py --report mqar.jsonl --table table.md \
        --plot mqar.png

Settings: see `mqar_model.py` (`nha-M64-W64`, `gsa-M64`, `swa-W64`, `full`,
`hybrid-M64`, any M/W).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mqar_data import check_mqar_arguments  # noqa: E402
from mqar_data import mqar_batches  # noqa: E402
from mqar_model import parse_setting  # noqa: E402
from mqar_model import state_floats  # noqa: E402

_TRAIN_STREAM, _TEST_STREAM = 0, 1


def _stacked_batches(runs, args, stream, pairs_of, pad_to=0):
    """Batches of every run stacked on a leading axis; answers padded to the
    most pairs of any run (weight 0 on the padding).

    Args:
        runs: list of `(train_pairs, seed, lr)`.
        args: the parsed command line.
        stream: the data stream (train or test).
        pairs_of: maps a run to the pair count(s) of its batches.
        pad_to: pad the answers to at least this many (one shape for all).
    """
    streams = [mqar_batches(seed, args.batch_size, args.seq_len,
                            pairs_of(run), args.vocab, stream,
                            args.placement)
               for run in runs for seed in [run[1]]]
    while True:
        batches = [next(generator) for generator in streams]
        most = max([pad_to] + [b["answers"].shape[1] for b in batches])
        pad = lambda a: np.pad(a, ((0, 0), (0, most - a.shape[1])))
        yield (np.stack([b["tokens"] for b in batches]),) + tuple(
            np.stack([pad(b[name]) for b in batches])
            for name in ("positions", "answers", "weights"))


def _prefetch(generator, depth=8):
    """Runs a batch generator in a background thread."""
    import queue
    import threading

    buffer = queue.Queue(depth)

    def fill():
        for item in generator:
            buffer.put(item)

    threading.Thread(target=fill, daemon=True).start()
    while True:
        yield buffer.get()


def train_setting(setting, runs, args, emit):
    """Trains one setting for every (pairs, seed, lr) in `runs`, vmapped.

    Args:
        setting: a setting name (`mqar_model.py`).
        runs: list of `(train_pairs, seed, peak_learning_rate)`, where
            `train_pairs` is a pair count or a tuple of them (a mixture).
            Each run is tested at every pair count of `args.pairs` it
            trained on.
        args: the parsed command line.
        emit: called as `emit(record, final)` with one dict per run: at
            every `--eval-every` steps (final=False) and at the end.
    """
    import jax
    import jax.numpy as jnp
    import keras

    from mqar_model import build_mqar_model

    started = time.time()
    # A float learning rate is an optimizer variable, so every vmapped run
    # carries its own; `train_step` sets it from the schedule each step.
    optimizer = keras.optimizers.AdamW(
        1.0, weight_decay=args.weight_decay, global_clipnorm=args.clipnorm)

    def build(seed):
        keras.utils.set_random_seed(seed)
        return build_mqar_model(setting, args.vocab, args.hidden,
                                args.heads, 2 * args.hidden,
                                args.implementation, args.short_conv)

    model = build(runs[0][1])
    optimizer.build(model.trainable_variables)
    names = [v.name for v in optimizer.variables]
    rate_index, iteration_index = (names.index("learning_rate"),
                                   names.index("iteration"))
    trainable, non_trainable, optimizer_state = [], [], []
    for _, seed, _ in runs:
        fresh = build(seed)
        trainable.append([v.value for v in fresh.trainable_variables])
        non_trainable.append([v.value for v in fresh.non_trainable_variables])
        optimizer_state.append([v.value for v in optimizer.variables])
    stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
    trainable, non_trainable, optimizer_state = map(
        stack, (trainable, non_trainable, optimizer_state))

    def loss_and_accuracy(trainable, non_trainable, tokens, positions,
                          answers, weights):
        logits, non_trainable = model.stateless_call(
            trainable, non_trainable,
            {"token_ids": tokens, "positions": positions})
        logits = logits.astype("float32")
        picked = jnp.take_along_axis(logits, answers[..., None], -1)[..., 0]
        loss = jnp.sum((jax.nn.logsumexp(logits, -1) - picked) * weights)
        hits = jnp.sum((jnp.argmax(logits, -1) == answers) * weights)
        count = jnp.sum(weights)
        return loss / count, (hits / count, non_trainable)

    def learning_rate(peak, iteration):
        """Linear warmup, then cosine decay to 1% of the peak."""
        iteration = iteration.astype("float32")
        warmup = jnp.minimum(1.0, (iteration + 1) / max(args.warmup, 1))
        progress = jnp.clip((iteration - args.warmup)
                            / max(args.steps - args.warmup, 1), 0.0, 1.0)
        cosine = 0.01 + 0.99 * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return peak * warmup * cosine

    peaks = jnp.array([lr for _, _, lr in runs], "float32")

    def train_step(trainable, non_trainable, optimizer_state, peak, batch):
        optimizer_state = list(optimizer_state)
        optimizer_state[rate_index] = learning_rate(
            peak, optimizer_state[iteration_index]).astype(
                optimizer_state[rate_index].dtype)
        (loss, (accuracy, non_trainable)), grads = jax.value_and_grad(
            loss_and_accuracy, has_aux=True)(trainable, non_trainable, *batch)
        trainable, optimizer_state = optimizer.stateless_apply(
            optimizer_state, grads, trainable)
        return trainable, non_trainable, optimizer_state, loss, accuracy

    step = jax.jit(jax.vmap(train_step), donate_argnums=(0, 1, 2))
    def test_step(trainable, non_trainable, *batch):
        loss, (accuracy, _) = loss_and_accuracy(trainable, non_trainable,
                                                *batch)
        return loss, accuracy

    evaluate = jax.jit(jax.vmap(test_step))

    if isinstance(runs[0][0], tuple):   # a mixture: test every count
        test_plan = [(pairs, lambda run, pairs=pairs: pairs)
                     for pairs in runs[0][0]]
    else:                               # each run at its own count
        test_plan = [(None, lambda run: run[0])]

    def test(count):
        """`{pairs or None: [2, runs] mean (loss, accuracy)}`, test stream."""
        results = {}
        for pairs, pairs_of in test_plan:
            tests = _stacked_batches(runs, args, _TEST_STREAM, pairs_of,
                                     pad_to=max(args.pairs))
            totals = np.zeros((2, len(runs)))
            for _ in range(count):
                loss, accuracy = evaluate(trainable, non_trainable,
                                          *next(tests))
                totals += np.stack([np.asarray(loss), np.asarray(accuracy)])
            results[pairs] = totals / count
        return results

    head_dim = args.hidden // args.heads
    windows, slots = parse_setting(setting)
    params = model.count_params()
    floats = state_floats(setting, args.seq_len, args.heads, head_dim)

    def records(results, step_count):
        for tested, totals in results.items():
            for i, (train_pairs, seed, lr) in enumerate(runs):
                pairs = train_pairs if tested is None else tested
                yield dict(
                    setting=setting, kind=setting.split("-")[0], pairs=pairs,
                    train_pairs=list(_as_tuple(train_pairs)),
                    placement=args.placement, short_conv=args.short_conv,
                    seed=seed, lr=lr, step=step_count, seq_len=args.seq_len,
                    vocab=args.vocab,
                    windows=[w if w is not None else "global" for w in windows],
                    slots=slots, state_floats=floats,
                    test_accuracy=float(totals[1, i]),
                    test_loss=float(totals[0, i]),
                    final_train_loss=float(last_loss[i]),
                    final_train_accuracy=float(last_accuracy[i]),
                    steps=args.steps, batch_size=args.batch_size,
                    warmup=args.warmup, weight_decay=args.weight_decay,
                    clipnorm=args.clipnorm, hidden=args.hidden, heads=args.heads,
                    params=params, implementation=args.implementation,
                    runs_vmapped=len(runs), compile_s=round(compile_seconds, 2),
                    train_s=round(time.time() - train_started, 2),
                    wall_s=round(time.time() - started, 2),
                    device=str(jax.devices()[0].device_kind),
                    backend=jax.default_backend())

    batches = _prefetch(_stacked_batches(
        runs, args, _TRAIN_STREAM,
        lambda run: list(run[0]) if isinstance(run[0], tuple) else run[0]))
    label = f"{setting} T={args.seq_len} runs={runs}"
    print(f"[{label}] start: {params} params, state {floats} floats",
          flush=True)
    compile_seconds = None
    last_loss = last_accuracy = np.full(len(runs), np.nan)
    train_started = time.time()
    done = 0
    for index in range(args.steps):
        batch = next(batches)
        trainable, non_trainable, optimizer_state, loss, accuracy = step(
            trainable, non_trainable, optimizer_state, peaks, batch)
        if index == 0:
            jax.block_until_ready(loss)
            compile_seconds = time.time() - train_started
            train_started = time.time()
        done = index + 1
        if done % args.log_every == 0 or done == args.steps:
            last_loss, last_accuracy = np.asarray(loss), np.asarray(accuracy)
            rate = index / max(time.time() - train_started, 1e-9)
            print(f"[{label}] step {done}/{args.steps} "
                  f"loss {np.round(last_loss, 3).tolist()} "
                  f"acc {np.round(last_accuracy, 3).tolist()} "
                  f"({rate:.1f} steps/s)", flush=True)
            if args.time_limit and time.time() - started > args.time_limit:
                print(f"[{label}] time limit: stopped at step {done}",
                      flush=True)
                break
        if args.eval_every and done % args.eval_every == 0 and (
                done < args.steps):
            for line in records(test(max(1, args.eval_batches // 4)), done):
                emit(line, final=False)
    jax.block_until_ready(trainable)
    rate = (done - 1) / max(time.time() - train_started, 1e-9)
    for line in records(test(args.eval_batches), done):
        line["test_sequences"] = args.eval_batches * args.batch_size
        line["steps_per_s"] = round(rate, 2)
        emit(line, final=True)


def _as_tuple(train_pairs):
    return train_pairs if isinstance(train_pairs, tuple) else (train_pairs,)


def run_training(args):
    import keras

    if keras.config.backend() != "jax":
        raise SystemExit("benchmarks/mqar.py trains on JAX: set "
                         "KERAS_BACKEND=jax.")
    for pairs in args.pairs:
        check_mqar_arguments(args.batch_size, args.seq_len, pairs, args.vocab)
    for setting in args.settings:
        parse_setting(setting)
    # A mixture trains one model per (seed, lr) on all pair counts at once.
    train_pairs = [tuple(args.pairs)] if args.mixture else args.pairs
    runs = [(pairs, seed, lr) for pairs in train_pairs for seed in args.seeds
            for lr in args.lr]

    def emit(record, final):
        """Final runs go to --output, checkpoints to --output.progress."""
        line = json.dumps(record)
        print(("RESULT " if final else "PROGRESS ") + line, flush=True)
        if args.output:
            path = args.output if final else args.output + ".progress"
            with open(path, "a") as handle:
                handle.write(line + "\n")

    for setting in args.settings:
        train_setting(setting, runs, args, emit)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--settings", nargs="+",
                        default=["nha-M64-W64", "gsa-M64", "swa-W64", "full",
                                 "hybrid-M64"])
    parser.add_argument("--pairs", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, nargs="+", default=[2e-3],
                        help="peak learning rates (each one a run)")
    parser.add_argument("--clipnorm", type=float, default=1.0)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=0,
                        help="test every N steps (JSON to OUTPUT.progress)")
    parser.add_argument("--mixture", action="store_true",
                        help="train each (seed, lr) once on a mixture of all "
                             "--pairs (rows split evenly), test at each")
    parser.add_argument("--placement", default="uniform",
                        choices=["uniform", "power"],
                        help="where the queries sit (mqar_data.py)")
    parser.add_argument("--short-conv", type=int, default=0,
                        help="causal depthwise convolution of this kernel "
                             "size on the embeddings (0: none)")
    parser.add_argument("--time-limit", type=float, default=0,
                        help="seconds after start: stop training at the next "
                             "log line past it, then test (0: no limit)")
    parser.add_argument("--implementation", default="chunked")
    parser.add_argument("--output", help="JSON lines file (appended)")
    parser.add_argument("--report", nargs="+",
                        help="result files to tabulate/plot (no training)")
    parser.add_argument("--table", help="markdown table path (with --report)")
    parser.add_argument("--plot", help="PNG path (with --report)")
    parser.add_argument("--curves", nargs="+",
                        help="with --report: progress files, then the PNG "
                             "path of accuracy-vs-step curves")
    args = parser.parse_args(argv)
    if args.report:
        from mqar_report import write_report

        write_report(args.report, args.table, args.plot)
        if args.curves:
            from mqar_report import equal_step_table
            from mqar_report import plot_curves

            plot_curves(args.curves[:-1] + args.report, args.curves[-1])
            table = equal_step_table(args.curves[:-1] + args.report)
            if args.table:
                with open(args.table, "a") as handle:
                    handle.write("\n" + table + "\n")
        return
    run_training(args)


if __name__ == "__main__":
    main()
