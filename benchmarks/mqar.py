r"""Multi-query associative recall (MQAR) with NHA, GSA, sliding window, full
attention and a GSA/global hybrid, all built from `keras_nha`.

Trains the same two-layer model (d_model 128) in each setting on MQAR batches
generated on the device (`mqar_device_data.py`), on JAX: all runs of a
setting (seeds x learning rates) train at once under `jax.vmap`, many steps
per jitted call (`mqar_train.py`). Every run trains on the mixture of all
`--pairs` and is tested at each on the fixed numpy test stream
(`mqar_data.py`). Every finished run and tested pair count is one JSON line
in `--output`, every checkpoint one in `--output`.progress; `--checkpoint`
and `--resume` carry the runs from one GPU round to the next.

    # train (JAX backend), session 3's recipe
    KERAS_BACKEND=jax python benchmarks/mqar.py --settings nha-M16-W16 \
        --seq-len 256 --vocab 512 --pairs 8 16 32 64 --mixture \
        --placement power --short-conv 3 --weight-decay 0.1 --seeds 0 1 \
        --lr 1e-3 3e-3 --steps 3000 --warmup 75 --chunk-size 16 \
        --output mqar.jsonl --checkpoint nha.npz
    # ... and later the same command with --resume nha.npz (and a larger
    # --time-limit budget) continues them up to --steps
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mqar_data import check_mqar_arguments  # noqa: E402
from mqar_model import parse_setting  # noqa: E402


def run_training(args):
    import keras

    if keras.config.backend() != "jax":
        raise SystemExit("benchmarks/mqar.py trains on JAX: set "
                         "KERAS_BACKEND=jax.")
    for pairs in args.pairs:
        check_mqar_arguments(args.batch_size, args.seq_len, pairs, args.vocab)
    for setting in args.settings:
        parse_setting(setting)
    # One model per (seed, lr), trained on the mixture of all pair counts.
    runs = [(tuple(args.pairs), seed, lr) for seed in args.seeds
            for lr in args.lr]
    if (args.resume or args.init_from) and len(args.settings) > 1:
        raise SystemExit("--resume and --init-from take one setting "
                         "(--settings X).")

    if args.test_only and not (args.resume or args.init_from):
        raise SystemExit("--test-only needs --resume or --init-from.")

    def emit(record, final):
        """Final runs go to --output, checkpoints to --output.progress,
        length-transfer tests (final="transfer") to --output.transfer."""
        line = json.dumps(record)
        suffix = {True: "", False: ".progress", "transfer": ".transfer"}[
            final]
        print({True: "RESULT ", False: "PROGRESS ",
               "transfer": "TRANSFER "}[final] + line, flush=True)
        if args.output:
            path = args.output + suffix
            with open(path, "a") as handle:
                handle.write(line + "\n")

    from mqar_train import train_setting

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
                        help="accepted for old command lines: every run "
                             "trains on the mixture of all --pairs (rows "
                             "split evenly) and is tested at each")
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
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="block length of the chunked kernel (default: "
                             "the kernel's)")
    parser.add_argument("--dtype-policy", default="float32",
                        help='Keras dtype policy, e.g. "mixed_bfloat16"')
    parser.add_argument("--steps-per-call", type=int, default=100,
                        help="training steps per jitted call (lax.scan)")
    parser.add_argument("--plan-seconds", type=float, default=0,
                        help="fix --steps after warmup (and --plan-after) "
                             "to what the measured rate fits into this many "
                             "seconds "
                             "from the start (--steps stays the upper bound;"
                             " a resumed run keeps its checkpoint's plan)")
    parser.add_argument("--plan-after", type=float, default=0,
                        help="with --plan-seconds: plan no earlier than this "
                             "many seconds after the start (when the other "
                             "processes on the card have compiled)")
    parser.add_argument("--plan-margin", type=float, default=0.85,
                        help="with --plan-seconds: the share of the measured "
                             "rate x seconds left that the plan takes")
    parser.add_argument("--replan", action="store_true",
                        help="with --resume and --plan-seconds: plan the "
                             "schedule again from the rate measured now "
                             "(it only grows: the runs use the time of the "
                             "rounds that follow)")
    parser.add_argument("--window-off-steps", type=int, default=0,
                        help="train the first N steps with the window of "
                             "every slot layer closed (W=0: GSA), then open "
                             "it (same weights)")
    parser.add_argument("--resume-warmup", type=int, default=0,
                        help="after --resume, ramp the learning rate up "
                             "again over this many steps (the AdamW moments "
                             "restart at zero)")
    parser.add_argument("--checkpoint-bits", type=int, default=16,
                        choices=[8, 16],
                        help="weights in checkpoints: 16 (float16) or 8 "
                             "(int8, one scale per row; half the bytes)")
    parser.add_argument("--stop-at", type=int, default=0,
                        help="stop training at this step (the schedule "
                             "still spans --steps; 0: at --steps)")
    parser.add_argument("--checkpoint",
                        help="save the runs here (.npz) at every test and "
                             "at the end (one setting)")
    parser.add_argument("--resume",
                        help="continue the runs saved in this .npz (same "
                             "setting, runs and recipe; --steps is the total "
                             "of the learning-rate schedule)")
    parser.add_argument("--init-from",
                        help="start from the weights of these seeds' runs "
                             "in this .npz (same setting, vocabulary and "
                             "width; any T, pairs or schedule): fine-tuning "
                             "at another length, or --test-only")
    parser.add_argument("--tag",
                        help="appended to the setting's name in the results "
                             "(e.g. ft1024 for a fine-tuned run)")
    parser.add_argument("--test-only", action="store_true",
                        help="no training: test the --resume or "
                             "--init-from weights (and --transfer-lengths)")
    parser.add_argument("--transfer-lengths", type=int, nargs="+",
                        help="after the final test, test the same weights "
                             "at these sequence lengths too (JSON to "
                             "OUTPUT.transfer)")
    parser.add_argument("--transfer-pairs", type=int, nargs="+",
                        default=[16, 32, 64, 128, 255],
                        help="pair counts of the length-transfer tests "
                             "(those that fit T and the vocabulary)")
    parser.add_argument("--transfer-sequences", type=int, default=256,
                        help="test sequences per run, length and pair count "
                             "of the length-transfer tests")
    parser.add_argument("--output", help="JSON lines file (appended)")
    parser.add_argument("--report", nargs="+",
                        help="result files to tabulate/plot (no training)")
    parser.add_argument("--table", help="markdown table path (with --report)")
    parser.add_argument("--plot", help="PNG path (with --report)")
    parser.add_argument("--curves", nargs="+",
                        help="with --report: progress files, then the PNG "
                             "path of accuracy-vs-step curves")
    parser.add_argument("--seed-curves",
                        help="with --curves: PNG path of the curves of "
                             "every seed")
    parser.add_argument("--panels", nargs="+",
                        help="with --seed-curves: the panels to draw, as "
                             "T:pairs (default: every one)")
    parser.add_argument("--curve-settings", nargs="+",
                        help="with --seed-curves: only these settings")
    args = parser.parse_args(argv)
    if args.report:
        from mqar_report import seed_table
        from mqar_report import throughput_table
        from mqar_report import write_report

        write_report(args.report, args.table, args.plot)
        runs = seed_table(args.report)
        if args.table and runs:
            with open(args.table, "a") as handle:
                handle.write("\nEvery run:\n\n" + runs + "\n")
        speeds = throughput_table(args.report)
        if args.table and speeds:
            with open(args.table, "a") as handle:
                handle.write("\nThroughput (steps/s of the whole vmapped "
                             "step, card shared by all processes):\n\n"
                             + speeds + "\n")
        if args.curves:
            from mqar_report import equal_step_table
            from mqar_report import plot_curves

            plot_curves(args.curves[:-1] + args.report, args.curves[-1])
            if args.seed_curves:
                from mqar_report import plot_seed_curves

                panels = [tuple(int(n) for n in panel.split(":"))
                          for panel in args.panels or []]
                plot_seed_curves(args.curves[:-1] + args.report,
                                 args.seed_curves, panels,
                                 args.curve_settings)
            table = equal_step_table(args.curves[:-1] + args.report)
            if args.table:
                with open(args.table, "a") as handle:
                    handle.write("\n" + table + "\n")
        return
    run_training(args)


if __name__ == "__main__":
    main()
