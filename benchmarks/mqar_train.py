"""Training loop of the MQAR study: every run of one setting at once, on JAX.

All runs of a setting (seeds x learning rates) train together under
`jax.vmap` in one jitted call that does `--steps-per-call` steps in a
`lax.scan`, generating each step's batches on the device
(`mqar_device_data.py`): one compilation, and no host work, Python dispatch
or host-to-device copy per step. The test sets are the numpy generator's
fixed test stream (`mqar_data`, stream 1), identical for every setting.
"""

import os
import threading
import time

import numpy as np

from mqar_checkpoint import load_checkpoint
from mqar_checkpoint import save_checkpoint
from mqar_data import mqar_batches
from mqar_model import parse_setting
from mqar_model import state_floats

TEST_STREAM = 1


def _test_batches(runs, args, pairs, seq_len=None, most=None,
                  batch_size=None):
    """Test batches of every run (its seed's test stream) at one pair count,
    stacked on a leading run axis, answers padded to `most` pairs (default:
    the most of `args.pairs`); `seq_len` and `batch_size` default to the
    training ones."""
    streams = [mqar_batches(seed, batch_size or args.batch_size,
                            seq_len or args.seq_len, pairs, args.vocab,
                            TEST_STREAM, args.placement)
               for _, seed, _ in runs]
    most = most or max(args.pairs)
    pad = lambda a: np.pad(a, ((0, 0), (0, most - a.shape[1])))
    while True:
        batches = [next(stream) for stream in streams]
        yield (np.stack([b["tokens"] for b in batches]),) + tuple(
            np.stack([pad(b[name]) for b in batches])
            for name in ("positions", "answers", "weights"))


def transfer_cells(lengths, pairs, vocab, trained_seq_len):
    """The length-transfer tests a model can take: `[(T, [pairs...])]` for
    every `T` in `lengths` other than the trained one, with the pair counts
    that fit (`T >= 4 * pairs` and `pairs` distinct keys in the vocabulary,
    as `mqar_data.check_mqar_arguments` requires); lengths where none fits
    are left out."""
    cells = []
    for length in lengths:
        fits = [count for count in pairs
                if length >= 4 * count and vocab // 2 - 1 >= count]
        if length != trained_seq_len and fits:
            cells.append((length, fits))
    return cells


def transfer_batch_size(seq_len, tokens=16384):
    """Test sequences per run and call at length `seq_len` (about `tokens`
    tokens, 4 to 64 sequences: a global layer's scores grow with T^2)."""
    return int(min(64, max(4, tokens // seq_len)))


def learning_rate(peak, step, warmup, total):
    """Linear warmup over `warmup` steps, then cosine decay to 1% of the peak
    at `total` steps (jax arrays in, float32 out)."""
    import jax.numpy as jnp

    step = jnp.asarray(step, "float32")
    rise = jnp.minimum(1.0, (step + 1) / max(warmup, 1))
    progress = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0),
                        0.0, 1.0)
    return peak * rise * (0.01 + 0.99 * 0.5 * (1 + jnp.cos(jnp.pi * progress)))


def train_setting(setting, runs, args, emit):
    """Trains one setting for every `(train_pairs, seed, lr)` in `runs`.

    Args:
        setting: a setting name (`mqar_model.py`).
        runs: list of `(train_pairs, seed, peak_learning_rate)`;
            `train_pairs` is a tuple of pair counts (the mixture every run
            trains on, tested at each count).
        args: the parsed command line of `mqar.py`.
        emit: called as `emit(record, final)` with one dict per run and
            tested pair count: at every `--eval-every` steps (final=False)
            and at the end.
    """
    import jax
    import jax.numpy as jnp
    import keras

    from mqar_device_data import device_mqar_batch
    from mqar_model import build_mqar_model

    started = time.time()
    # "mixed_bfloat16": bfloat16 compute, float32 weights and optimizer.
    keras.config.set_dtype_policy(args.dtype_policy)
    optimizer = keras.optimizers.AdamW(
        1.0, weight_decay=args.weight_decay, global_clipnorm=args.clipnorm)

    def build(seed):
        keras.utils.set_random_seed(seed)
        return build_mqar_model(setting, args.vocab, args.hidden, args.heads,
                                2 * args.hidden, args.implementation,
                                args.short_conv, args.chunk_size)

    model = build(runs[0][1])
    # --window-off-steps: the first steps train the same weights with the
    # window of every slot layer closed (W = 0 there: GSA), so that the
    # slots, not the window, have to carry recall early on.
    slots_only = None
    if args.window_off_steps:
        slots_only = build_mqar_model(
            setting, args.vocab, args.hidden, args.heads, 2 * args.hidden,
            args.implementation, args.short_conv, args.chunk_size,
            slots_only=True)
        shapes = lambda m: [tuple(v.shape) for v in m.trainable_variables]
        if shapes(slots_only) != shapes(model):
            raise ValueError(f"`window_off_steps`: {setting} without its "
                             f"window has other weights.")
    optimizer.build(model.trainable_variables)
    rate_index = [v.name for v in optimizer.variables].index("learning_rate")
    trainable, non_trainable = [], []
    for _, seed, _ in runs:
        fresh = build(seed)
        trainable.append([v.value for v in fresh.trainable_variables])
        non_trainable.append([v.value for v in fresh.non_trainable_variables])
    stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
    trainable, non_trainable = stack(trainable), stack(non_trainable)
    first_step = 0
    if args.init_from:
        # Another run's weights (e.g. trained at a shorter T), then a
        # schedule of its own from step 0.
        from mqar_checkpoint import load_weights

        loaded, loaded_fixed, init_step = load_weights(
            args.init_from, setting, [seed for _, seed, _ in runs], args)
        trainable = [jnp.asarray(v) for v in loaded]
        non_trainable = [jnp.asarray(v) for v in loaded_fixed]
        print(f"[{setting}] weights of step {init_step} from "
              f"{args.init_from}", flush=True)
        if args.test_only:   # the records name the step tested
            first_step = init_step
    if args.resume:
        first_step, args.steps, trainable, non_trainable = load_checkpoint(
            args.resume, setting, runs, args)
        trainable = [jnp.asarray(v) for v in trainable]
        non_trainable = [jnp.asarray(v) for v in non_trainable]
        print(f"[{setting}] resumed at step {first_step} of {args.steps} "
              f"from {args.resume}", flush=True)
    # Fresh AdamW moments (also on resume: see mqar_checkpoint.py).
    optimizer_state = stack([[v.value for v in optimizer.variables]] *
                            len(runs))

    def loss_and_accuracy(trainable, non_trainable, tokens, positions,
                          answers, weights, window_open=True):
        logits, non_trainable = (model if window_open else
                                 slots_only).stateless_call(
            trainable, non_trainable,
            {"token_ids": tokens, "positions": positions})
        logits = logits.astype("float32")
        picked = jnp.take_along_axis(logits, answers[..., None], -1)[..., 0]
        loss = jnp.sum((jax.nn.logsumexp(logits, -1) - picked) * weights)
        hits = jnp.sum((jnp.argmax(logits, -1) == answers) * weights)
        count = jnp.sum(weights)
        return loss / count, (hits / count, non_trainable)

    def train_step(trainable, non_trainable, optimizer_state, peak, data_key,
                   step, total, window_open):
        batch = device_mqar_batch(jax.random.fold_in(data_key, step),
                                  args.batch_size, args.seq_len, args.pairs,
                                  args.vocab, args.placement)
        optimizer_state = list(optimizer_state)
        # A resumed run's AdamW moments start at zero: its rate ramps up
        # again over --resume-warmup steps while they refill.
        rewarm = jnp.minimum(1.0, (step - first_step + 1.0) / max(
            args.resume_warmup, 1)) if first_step else 1.0
        optimizer_state[rate_index] = (rewarm * learning_rate(
            peak, step, args.warmup, total)).astype(
                optimizer_state[rate_index].dtype)
        (loss, (accuracy, non_trainable)), grads = jax.value_and_grad(
            loss_and_accuracy, has_aux=True)(trainable, non_trainable, *batch,
                                             window_open)
        trainable, optimizer_state = optimizer.stateless_apply(
            optimizer_state, grads, trainable)
        return trainable, non_trainable, optimizer_state, loss, accuracy

    vmapped_step = jax.vmap(train_step,
                            in_axes=(0, 0, 0, 0, 0, None, None, None))

    def many_steps(trainable, non_trainable, optimizer_state, peaks,
                   data_keys, first, total, count, window_open):
        def body(carry, step):
            out = vmapped_step(*carry, peaks, data_keys, step, total,
                               window_open)
            return out[:3], out[3:]

        carry, (losses, accuracies) = jax.lax.scan(
            body, (trainable, non_trainable, optimizer_state),
            first + jnp.arange(count))
        return carry + (losses[-1], accuracies[-1])

    steps_call = jax.jit(many_steps, static_argnums=(7, 8),
                         donate_argnums=(0, 1, 2))

    def test_step(trainable, non_trainable, *batch):
        loss, (accuracy, _) = loss_and_accuracy(trainable, non_trainable,
                                                *batch)
        return loss, accuracy

    evaluate = jax.jit(jax.vmap(test_step))
    # The test step compiles in a thread while the training starts (on a
    # GPU it took as long as the training step: 40-150 s of a round).
    compiled_test = {}
    cells = transfer_cells(args.transfer_lengths or [], args.transfer_pairs,
                           args.vocab, args.seq_len)
    transfer_batch = lambda length: min(transfer_batch_size(length),
                                        args.transfer_sequences)

    def compile_test():
        shape = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
        shapes = (jax.tree.map(shape, trainable),
                  jax.tree.map(shape, non_trainable))
        batch = next(_test_batches(runs, args, max(args.pairs)))
        compiled_test["call"] = evaluate.lower(*shapes, *batch).compile()
        for length, counts in cells:   # the length-transfer tests too
            batch = next(_test_batches(runs, args, counts[0], length,
                                       max(counts),
                                       transfer_batch(length)))
            compiled_test[length] = evaluate.lower(*shapes, *batch).compile()

    compiling = threading.Thread(target=compile_test, daemon=True)
    compiling.start()
    peaks = jnp.array([lr for _, _, lr in runs], "float32")
    # Both learning rates of a seed see the same batches (as on the host).
    data_keys = jax.vmap(jax.random.key)(
        jnp.array([seed for _, seed, _ in runs]))

    def test(count, length=None, counts=None):
        """`{pairs: [2, runs] mean (loss, accuracy)}` on the test stream
        (`count` batches per pair count; at the training length and pairs,
        or at `length` with the pair counts `counts`)."""
        results = {}
        compiling.join()
        call = compiled_test.get(length or "call", evaluate)
        for pairs in counts or args.pairs:
            batches = (_test_batches(runs, args, pairs, length, max(counts),
                                     transfer_batch(length))
                       if length else _test_batches(runs, args, pairs))
            totals = np.zeros((2, len(runs)))
            for _ in range(count):
                loss, accuracy = call(trainable, non_trainable,
                                      *next(batches))
                totals += np.stack([np.asarray(loss), np.asarray(accuracy)])
            results[pairs] = totals / count
        return results

    params = model.count_params()
    floats = state_floats(setting, args.seq_len, args.heads,
                          args.hidden // args.heads)
    windows, slots = parse_setting(setting)
    # A variant of the recipe is part of the name the report groups by.
    label_name = setting + (f"+woff{args.window_off_steps}"
                            if args.window_off_steps else "") + (
        f"+{args.tag}" if args.tag else "")
    label = f"{label_name} T={args.seq_len} runs={[r[1:] for r in runs]}"
    print(f"[{label}] start: {params} params, state {floats} floats",
          flush=True)

    def records(results, step):
        for pairs, totals in results.items():
            for i, (train_pairs, seed, lr) in enumerate(runs):
                yield dict(
                    setting=label_name, base_setting=setting,
                    kind=setting.split("-")[0], pairs=pairs,
                    train_pairs=list(train_pairs), placement=args.placement,
                    short_conv=args.short_conv, seed=seed, lr=lr, step=step,
                    seq_len=args.seq_len, vocab=args.vocab,
                    windows=[w if w is not None else "global"
                             for w in windows],
                    slots=slots, state_floats=floats,
                    test_accuracy=float(totals[1, i]),
                    test_loss=float(totals[0, i]),
                    final_train_loss=float(last[0][i]),
                    final_train_accuracy=float(last[1][i]),
                    steps=args.steps, batch_size=args.batch_size,
                    warmup=args.warmup, weight_decay=args.weight_decay,
                    clipnorm=args.clipnorm, hidden=args.hidden,
                    heads=args.heads, params=params,
                    implementation=args.implementation,
                    chunk_size=args.chunk_size, resumed_from=first_step,
                    dtype_policy=args.dtype_policy,
                    xla_flags=os.environ.get("XLA_FLAGS", "").strip(),
                    steps_per_call=args.steps_per_call,
                    window_off_steps=args.window_off_steps,
                    resume_warmup=args.resume_warmup,
                    runs_vmapped=len(runs), trained_seq_len=args.seq_len,
                    init_from=args.init_from,
                    compile_s=round(compile_seconds or 0.0, 2),
                    steps_per_s=round(rate, 2),
                    train_s=round(time.time() - train_started, 2),
                    wall_s=round(time.time() - started, 2),
                    device=str(jax.devices()[0].device_kind),
                    backend=jax.default_backend())

    per_call = max(1, args.steps_per_call)
    compile_seconds, rate, phases_seen = None, 0.0, set()
    last = (np.full(len(runs), np.nan),) * 2
    step = first_step
    stop = step if args.test_only else min(args.steps,
                                           args.stop_at or args.steps)
    # A resumed run keeps its plan, unless it stopped before planning or
    # --replan lets it plan again (only ever longer).
    planning = bool(args.plan_seconds) and (first_step < args.warmup
                                            or args.replan)
    planned_before = args.steps
    plan_after = max(args.warmup, first_step)
    timed_steps = train_seconds = 0.0
    train_started = time.time()
    next_log = (step // args.log_every + 1) * args.log_every
    next_eval = ((step // args.eval_every + 1) * args.eval_every
                 if args.eval_every else args.steps + 1)
    while step < stop:
        # Calls end exactly at log and test points; a shorter call compiles
        # once more.
        count = min(per_call, stop - step, next_log - step, next_eval - step)
        window_open = step >= args.window_off_steps
        if not window_open:   # the window opens at a call boundary
            count = min(count, args.window_off_steps - step)
        call_started = time.time()
        trainable, non_trainable, optimizer_state, loss, accuracy = (
            steps_call(trainable, non_trainable, optimizer_state, peaks,
                       data_keys, step, float(args.steps), count,
                       window_open))
        jax.block_until_ready(loss)
        step += count
        if window_open not in phases_seen:
            # the first call compiles (again when the window opens)
            phases_seen.add(window_open)
            compile_seconds = (compile_seconds or 0.0) + (
                time.time() - call_started)
        else:   # steps/s of training alone (tests and saving excluded)
            timed_steps += count
            train_seconds += time.time() - call_started
            rate = timed_steps / max(train_seconds, 1e-9)
        if planning and step >= plan_after and rate and (
                time.time() - started >= args.plan_after):
            # The schedule's length: what the measured rate fits into the
            # planned seconds, fixed once the warmup is over and
            # --plan-after seconds have passed (other processes sharing the
            # card have compiled by then; until then the decay followed the
            # --steps upper bound, i.e. stayed within a few % of the peak).
            planning = False
            left = args.plan_seconds - (time.time() - started)
            fits = step + max(args.log_every, int(
                args.plan_margin * rate * left) // args.log_every
                * args.log_every)
            args.steps = (max(planned_before, fits)
                          if first_step >= args.warmup
                          else min(args.steps, fits))
            stop = min(args.steps, args.stop_at or args.steps)
            print(f"[{label}] planned {args.steps} steps ({rate:.1f} "
                  f"steps/s, {left:.0f} s planned)", flush=True)
        if step >= next_log or step == stop:
            next_log += args.log_every
            last = (np.asarray(loss), np.asarray(accuracy))
            print(f"[{label}] step {step}/{args.steps} "
                  f"loss {np.round(last[0], 3).tolist()} "
                  f"acc {np.round(last[1], 3).tolist()} "
                  f"({rate:.1f} steps/s)", flush=True)
            if args.time_limit and time.time() - started > args.time_limit:
                print(f"[{label}] time limit: stopped at step {step}",
                      flush=True)
                break
        if step >= next_eval and step < stop:
            next_eval += args.eval_every
            for line in records(test(max(1, args.eval_batches // 4)), step):
                emit(line, final=False)
            if args.checkpoint:
                save_checkpoint(args.checkpoint, setting, runs, step,
                                trainable, non_trainable, args,
                                args.checkpoint_bits)
    jax.block_until_ready(trainable)
    if args.checkpoint and not args.test_only:
        save_checkpoint(args.checkpoint, setting, runs, step, trainable,
                        non_trainable, args, args.checkpoint_bits)
    for line in records(test(args.eval_batches), step):
        line["test_sequences"] = args.eval_batches * args.batch_size
        emit(line, final=True)
    # Length transfer: the same weights tested at other lengths (no
    # training there; one compiled test per length).
    for length, counts in cells:
        batch = transfer_batch(length)
        calls = max(1, args.transfer_sequences // batch)
        tested = time.time()
        for line in records(test(calls, length, counts), step):
            line.update(seq_len=length, transfer=True,
                        test_sequences=calls * batch,
                        state_floats=state_floats(
                            setting, length, args.heads,
                            args.hidden // args.heads))
            emit(line, final="transfer")
        print(f"[{label}] tested at T={length} ({time.time() - tested:.0f}"
              f" s)", flush=True)

