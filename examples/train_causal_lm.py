"""Train a small byte-level NHA causal language model, save it, sample from it.

The default corpus is the Python standard library's own source code, which
is on every machine that runs this script, so nothing is downloaded. Pass
`--data PATH` (a text file, or a directory searched for `--glob` files) to
train on your own text.

    KERAS_BACKEND=jax python examples/train_causal_lm.py

trains for a few minutes on a 2-core CPU, prints Keras' progress bar, the
validation loss next to the unigram baseline, saves a keras-hub preset
(`--output`), plots the loss curve (`--plot`) and generates a sample. Load
the result anywhere with `keras_nha.models.NHACausalLM.from_preset(OUTPUT)`.
"""

import argparse
import glob
import math
import os
import sysconfig
import time

import keras
import keras_hub
import numpy as np

from keras_nha.models import NHABackbone
from keras_nha.models import NHACausalLM
from keras_nha.models import NHACausalLMPreprocessor
from keras_nha.models import NHATokenizer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=None,
                      help="text file or directory (default: the Python "
                           "standard library source)")
    data.add_argument("--glob", default="**/*.py",
                      help="files to read under a --data directory")
    data.add_argument("--max-bytes", type=int, default=3_000_000,
                      help="read at most this much text")
    data.add_argument("--validation-fraction", type=float, default=0.05)
    model = parser.add_argument_group("model")
    model.add_argument("--num-layers", type=int, default=2)
    model.add_argument("--hidden-dim", type=int, default=128)
    model.add_argument("--num-heads", type=int, default=4)
    model.add_argument("--num-kv-heads", type=int, default=2)
    model.add_argument("--intermediate-dim", type=int, default=256)
    model.add_argument("--window-size", type=int, default=64)
    model.add_argument("--num-slots", type=int, default=16)
    train = parser.add_argument_group("training")
    train.add_argument("--sequence-length", type=int, default=256)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--steps", type=int, default=500)
    train.add_argument("--steps-per-epoch", type=int, default=100)
    train.add_argument("--learning-rate", type=float, default=3e-3)
    train.add_argument("--seed", type=int, default=0,
                       help="initialisation and training row order")
    out = parser.add_argument_group("output")
    out.add_argument("--output", default="nha_causal_lm_preset",
                     help="preset directory to write")
    out.add_argument("--plot", default=None,
                     help="loss curve PNG (default: OUTPUT/loss.png)")
    out.add_argument("--prompt", default="def ")
    out.add_argument("--sample-length", type=int, default=200)
    return parser.parse_args(argv)


def read_corpus(path, pattern, max_bytes):
    """Documents (bytes) in a stable order, at most `max_bytes` in total."""
    if path is None:
        root = sysconfig.get_paths()["stdlib"]
        files = sorted(f for f in glob.glob(os.path.join(root, "*.py")))
        files += sorted(glob.glob(os.path.join(root, "*", "*.py")))
        files = [f for f in files if "site-packages" not in f]
    elif os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, pattern), recursive=True))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"--data: no such file or directory: {path}")
    documents, total = [], 0
    for name in files:
        with open(name, "rb") as handle:
            text = handle.read()
        if not text:
            continue
        documents.append(text[:max_bytes - total])
        total += len(documents[-1])
        if total >= max_bytes:
            break
    if total < 10_000:
        raise ValueError(f"--data: only {total} bytes of text found; need at "
                         "least 10 kB to train and validate.")
    return documents


def split_documents(documents, fraction):
    """Whole documents for validation (every k-th one), bytes for training."""
    if len(documents) == 1:
        cut = int(len(documents[0]) * (1 - fraction))
        return documents[0][:cut], documents[0][cut:]
    step = max(2, round(1 / fraction))
    train = [d for i, d in enumerate(documents) if i % step]
    valid = [d for i, d in enumerate(documents) if not i % step]
    return b"\n".join(train), b"\n".join(valid)


def windows(ids, length, start_token):
    """Non-overlapping training rows `[<s>, ids...]` of `length + 1` tokens."""
    body = length
    count = len(ids) // body
    rows = ids[:count * body].reshape(count, body)
    return np.concatenate([np.full((count, 1), start_token, ids.dtype), rows],
                          axis=1)


def byte_rows(documents, tokenizer, validation_fraction, sequence_length):
    """Byte ids and rows `[N, sequence_length + 1]` for training and
    validation, and the unigram baseline (nats/byte); prints a summary.

    Returns:
        `(train_ids, valid_ids, train_rows, valid_rows, baseline)`.
    """
    train_text, valid_text = split_documents(documents, validation_fraction)
    offset = tokenizer.token_to_id("<0x00>")
    train_ids = np.frombuffer(train_text, np.uint8).astype("int32") + offset
    valid_ids = np.frombuffer(valid_text, np.uint8).astype("int32") + offset
    train_rows = windows(train_ids, sequence_length, tokenizer.start_token_id)
    valid_rows = windows(valid_ids, sequence_length, tokenizer.start_token_id)
    if not len(train_rows) or not len(valid_rows):
        raise ValueError("--data: too little text for one training and one "
                         "validation sequence of --sequence-length bytes.")
    baseline = unigram_cross_entropy(train_ids, valid_ids,
                                     tokenizer.vocabulary_size())
    print(f"corpus: {len(documents)} documents, {len(train_ids):,} train / "
          f"{len(valid_ids):,} validation bytes; unigram baseline "
          f"{baseline:.3f} nats/byte", flush=True)
    return train_ids, valid_ids, train_rows, valid_rows, baseline


def unigram_cross_entropy(train_ids, valid_ids, vocabulary_size):
    """Validation loss (nats/token) of the add-one unigram model of train."""
    counts = np.bincount(train_ids, minlength=vocabulary_size) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[valid_ids].mean())


class BatchLoss(keras.callbacks.Callback):
    """Records the training loss of every step for the plot.

    Keras logs the running mean over the epoch; the step's own loss is
    recovered from consecutive means.
    """

    def __init__(self):
        super().__init__()
        self.losses = []
        self._previous_mean = 0.0

    def on_train_batch_end(self, batch, logs=None):
        mean = float(logs["loss"])
        self.losses.append((batch + 1) * mean - batch * self._previous_mean)
        self._previous_mean = mean

    def on_epoch_begin(self, epoch, logs=None):
        self._previous_mean = 0.0


def plot(path, batch_losses, history, steps_per_epoch, baseline):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    smooth, average = [], batch_losses[0]
    for loss in batch_losses:
        average = 0.9 * average + 0.1 * loss
        smooth.append(average)
    steps = np.arange(1, len(batch_losses) + 1)
    axis.plot(steps, batch_losses, lw=0.5, alpha=0.3, color="C0")
    axis.plot(steps, smooth, color="C0", label="train (per step, smoothed)")
    valid = history.history.get("val_loss", [])
    axis.plot(steps_per_epoch * np.arange(1, len(valid) + 1), valid, "o-",
              label="validation")
    axis.axhline(baseline, color="gray", ls="--", label="unigram baseline")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats / byte)")
    axis.set_title(f"NHA byte-level causal LM ({keras.config.backend()})")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    started = time.time()

    tokenizer = NHATokenizer()
    documents = read_corpus(args.data, args.glob, args.max_bytes)
    _, _, train_rows, valid_rows, baseline = byte_rows(
        documents, tokenizer, args.validation_fraction, args.sequence_length)

    backbone = NHABackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=args.num_layers, num_query_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads, hidden_dim=args.hidden_dim,
        intermediate_dim=args.intermediate_dim, window_size=args.window_size,
        num_slots=args.num_slots)
    preprocessor = NHACausalLMPreprocessor(
        tokenizer, sequence_length=args.sequence_length)
    # Training runs on token ids; the preprocessor is attached afterwards.
    lm = NHACausalLM(backbone, preprocessor=None)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=args.steps, warmup_target=args.learning_rate,
        warmup_steps=max(1, args.steps // 20), alpha=0.1)
    lm.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01,
                                                clipnorm=1.0),
               weighted_metrics=[])
    print(f"model: {backbone.count_params():,} parameters, windows "
          f"{args.window_size}, {args.num_slots} slots, "
          f"backend {keras.config.backend()}")

    def as_inputs(rows):
        x = {"token_ids": rows[:, :-1],
             "padding_mask": np.ones_like(rows[:, :-1])}
        return x, rows[:, 1:]

    # keras-hub's fit() does not shuffle NumPy inputs (it warns and reads
    # them in order), and in file order the loss swings with each file.
    train_rows = np.random.default_rng(args.seed).permutation(train_rows)
    x, y = as_inputs(train_rows)
    validation = as_inputs(valid_rows[:args.batch_size * 16])
    epochs = max(1, math.ceil(args.steps / args.steps_per_epoch))
    batch_losses = BatchLoss()
    history = lm.fit(x, y, batch_size=args.batch_size, epochs=epochs,
                     steps_per_epoch=args.steps_per_epoch,
                     validation_data=validation, callbacks=[batch_losses],
                     verbose=1)
    valid_loss = history.history["val_loss"][-1]
    print(f"validation loss {valid_loss:.3f} nats/byte vs unigram baseline "
          f"{baseline:.3f} ({baseline - valid_loss:+.3f}); trained in "
          f"{time.time() - started:.0f} s")

    lm.preprocessor = preprocessor
    lm.save_to_preset(args.output)
    plot_path = args.plot or os.path.join(args.output, "loss.png")
    plot(plot_path, batch_losses.losses, history, args.steps_per_epoch,
         baseline)
    print(f"preset saved to {args.output}; loss curve in {plot_path}")

    lm.compile(sampler=keras_hub.samplers.TopKSampler(k=5, seed=args.seed))
    sample = lm.generate(args.prompt,
                         max_length=len(args.prompt.encode()) + 1
                         + args.sample_length)
    print("sample:\n" + sample)
    return valid_loss, baseline


if __name__ == "__main__":
    main()
