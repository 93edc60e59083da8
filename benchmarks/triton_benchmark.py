"""Speed of the NHA Triton kernels against attention peers (torch, one GPU).

The issue's table: B=1, H=16, K=V=128, M=64, W=512, bf16, T in {4096, 16384,
65536}, forward and forward+backward, for NHA (Triton), torch SDPA causal
(flash), FlexAttention with a sliding-window block mask, fla-core's
`chunk_gsa` (M=64), fla's windowed `parallel_attn`, and their composition (the
paper's hybrid). Then decode: B=8, one token with 65536 tokens of context,
SDPA over the full KV cache against the NHA step. Every row of a table comes
from the same run. Medians of `triton.testing.do_bench`.

    python benchmarks/triton_benchmark.py --json out.json --plot out.png
    python benchmarks/triton_benchmark.py --from-json out.json --plot out.png

FLOPs counted per (batch, head), forward: window 2 matmuls over the visible
keys, 4 d per (query, key) pair; slots 8 M d + 4 C (d + M) per token (C = 64,
the chunk); forward+backward = 3.5 x forward (the flash-attention
convention). Rates are against these counts, not against what a kernel
happens to execute.
"""

import argparse
import contextlib
import json
import os
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

B, H, D, M, W = 1, 16, 128, 64, 512
CHUNK = 64


def window_flops(length, window, d=D):
    """Forward FLOPs of causal attention over `window` keys, per head."""
    full = min(length, window)
    pairs = full * (full + 1) // 2 + (length - full) * window
    return 4 * d * pairs


def slot_flops(length, slots=M, d=D):
    return length * (8 * slots * d + 4 * CHUNK * (d + slots))


def _bench(fn, warmup=10, rep=50):
    import torch
    import triton

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep,
                                   return_mode="median")


def _ceilings():
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = _bench(lambda: a @ b)
    tflops = 2 * 8192 ** 3 / ms / 1e9
    x = torch.randn(1 << 28, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    ms_copy = _bench(lambda: y.copy_(x))
    bandwidth = 2 * x.numel() * 4 / ms_copy / 1e6
    return {"matmul_bf16_tflops": tflops, "copy_gbs": bandwidth}


def _inputs(length, grad=True, seed=0):
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", dtype=dtype,
                           generator=gen).requires_grad_(grad)

    q, k, v = rand(B, length, H, D), rand(B, length, H, D), rand(B, length,
                                                                 H, D)
    f = torch.randn(B, length, H, M, device="cuda", generator=gen)
    g = (torch.nn.functional.logsigmoid(f) / 8.0).requires_grad_(grad)
    return q, k, v, g


def _fwd_bwd(forward, inputs):
    import torch

    out = forward()
    grad = torch.randn_like(out)

    def step():
        result = forward()
        torch.autograd.grad(result, inputs, grad)
    return step


def nha_rows(length, graphs=None):
    """NHA fwd and fwd+bwd; with `graphs` (default: NHA_BENCH_GRAPHS=1) also
    replayed from CUDA graphs."""
    from keras_nha.kernels import state as state_lib
    from keras_nha.kernels.triton.sequence import triton_nha

    q, k, v, g = _inputs(length)
    state = state_lib.zero_state(B, H, D, D, M, min(W, length), "bfloat16")

    def forward():
        out, _ = triton_nha(q, k, v, g, window_size=W, scale=D ** -0.5,
                            window_query=q, window_key=k, padding_mask=None,
                            state=state)
        return out

    fwd, both = _fwd_and_both(forward, (q, k, v, g))
    flops = (window_flops(length, W) + slot_flops(length)) * B * H
    rows = {"NHA Triton (M=64, W=512)": (fwd, both, flops)}
    if graphs is None:
        graphs = os.environ.get("NHA_BENCH_GRAPHS") == "1"
    if graphs:
        # Replaying a captured step takes the CPU's launch time out: what
        # the kernels cost when the caller graphs its training step.
        try:
            step = _fwd_bwd(forward, (q, k, v, g))
            rows["NHA Triton, CUDA graph (M=64, W=512)"] = (
                _bench(_graphed(forward, grad=False)), _bench(_graphed(step)),
                flops)
        except Exception as error:  # the eager rows still count
            print(f"CUDA graph capture failed: {error!r}"[:300], flush=True)
    if length <= 16384:  # where the CPU's share matters
        rows.update(_user_rows(q, k, v, g, state, flops))
    if os.environ.get("NHA_BENCH_JIT_LAUNCH") == "1":
        try:
            rows.update(_jit_launch_rows(forward, (q, k, v, g), flops))
        except Exception as error:
            print(f"JIT launch rows failed: {error!r}"[:300], flush=True)
    return rows


def _user_rows(q, k, v, g, state, flops):
    """Eager rows of the CPU-side variants: the kernels without building the
    returned state, and the public op as a user calls it (validation, a
    zero state per call, dispatch, the returned state built and dropped)."""
    import keras_nha
    from keras_nha.kernels.triton.sequence import triton_nha

    def stateless():
        return triton_nha(q, k, v, g, window_size=W, scale=D ** -0.5,
                          window_query=q, window_key=k, padding_mask=None,
                          state=state, return_state=False)[0]

    def public():
        return keras_nha.ops.native_hybrid_attention(q, k, v, g, W,
                                                     implementation="triton")

    rows = {}
    for name, forward in (("NHA Triton, no returned state", stateless),
                          ("NHA via keras_nha.ops (eager)", public)):
        try:
            fwd, both = _fwd_and_both(forward, (q, k, v, g))
            rows[f"{name} (M=64, W=512)"] = (fwd, both, flops)
        except Exception as error:
            print(f"{name} failed: {error!r}"[:300], flush=True)
    return rows


def _jit_launch_rows(forward, inputs, flops):
    """The eager rows again with KERAS_NHA_TRITON_FAST_LAUNCH=0 (every
    launch through Triton's JIT, the default before session 5), after
    checking that output and gradients are bit-identical to the default
    cached launches."""
    import torch

    def outputs():
        out = forward()
        return [out] + list(torch.autograd.grad(out, inputs,
                                                torch.ones_like(out)))

    cached = outputs()
    os.environ["KERAS_NHA_TRITON_FAST_LAUNCH"] = "0"
    try:
        same = all(torch.equal(a, b) for a, b in zip(outputs(), cached))
        if not same:
            raise RuntimeError("cached launches changed the results")
        fwd, both = _fwd_and_both(forward, inputs)
    finally:
        os.environ.pop("KERAS_NHA_TRITON_FAST_LAUNCH")
    return {"NHA Triton, JIT launches (M=64, W=512)": (fwd, both, flops)}


def _graphed(fn, grad=True):
    """`fn` captured in a CUDA graph (after warm-up on a side stream, as
    torch.cuda.graph requires); returns the graph's replay."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.set_grad_enabled(grad):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.set_grad_enabled(grad):
        fn()
    return graph.replay


def _fwd_and_both(forward, inputs):
    """Median ms of `forward` without grad and of forward+backward."""
    import torch

    with torch.no_grad():
        fwd = _bench(forward)
    return fwd, _bench(_fwd_bwd(forward, inputs))


def _heads_first(length):
    """q, k, v as [B, H, T, D] leaves (torch attention's layout)."""
    q, k, v, _ = _inputs(length)
    return [x.detach().transpose(1, 2).contiguous().requires_grad_(True)
            for x in (q, k, v)]


def sdpa_rows(length):
    import torch
    from torch.nn.attention import SDPBackend
    from torch.nn.attention import sdpa_kernel

    q, k, v = _heads_first(length)

    def forward():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True)

    return {"SDPA causal (flash)": (*_fwd_and_both(forward, (q, k, v)),
                                    window_flops(length, length) * B * H)}


def flex_rows(length):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = _heads_first(length)

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < W)

    mask = create_block_mask(sliding, None, None, length, length,
                             device="cuda")
    flex = torch.compile(flex_attention, dynamic=False)

    def forward():
        return flex(q, k, v, block_mask=mask)

    return {"Flex sliding W=512": (*_fwd_and_both(forward, (q, k, v)),
                                   window_flops(length, W) * B * H)}


def fla_rows(length):
    tag = _prepare_fla_tuning()
    from fla.ops.attn import parallel_attn
    from fla.ops.gsa import chunk_gsa

    q, k, v, g = _inputs(length)
    gate = g.detach().to(q.dtype).requires_grad_(True)
    strength = (1 - gate.detach().float().exp()).to(q.dtype).requires_grad_(
        True)

    def gsa():
        out, _ = chunk_gsa(q, k, v, strength, gate)
        return out

    def window():
        return parallel_attn(q, k, v, window_size=W)

    def both_parts():
        # Timing only: the exact merge needs both parts' log-sum-exps.
        return gsa() + window()

    rows = {}
    for name, fn, inputs, flops in (
            ("fla chunk_gsa (M=64)", gsa, (q, k, v, strength, gate),
             slot_flops(length)),
            ("fla parallel_attn (W=512)", window, (q, k, v),
             window_flops(length, W)),
            ("fla composition (gsa + window)", both_parts,
             (q, k, v, strength, gate),
             slot_flops(length) + window_flops(length, W))):
        rows[name] = (*_fwd_and_both(fn, inputs), flops * B * H)
    return {name + _fla_tag(tag): values for name, values in rows.items()}


# Kernel name fragments -> the part of NHA they belong to (breakdown groups).
# The chunk-start states and the adjoints (prep + scans, or the sequential
# passes) are one group: the two routes compare there (the scan kernel serves
# both directions, so it cannot be split into forward and backward).
_STATES = "slot states + adjoints (fwd + bwd)"
_PARTS = (
    ("prep_kernel", _STATES), ("chunk_scan", _STATES),
    ("adjoint_delta", _STATES), ("state_pass", _STATES),
    ("adjoint_pass", _STATES),
    ("slot_forward", "slot pass (fwd)"),
    ("slot_readout", "slot readout (fwd output, bwd dq)"),
    ("window_forward", "window pass (fwd)"),
    ("row_dot", "window bwd"), ("window_dq", "window bwd"),
    ("window_dkdv", "window bwd"),
    ("slot_dq", "slot bwd"), ("slot_dx", "slot bwd"),
    ("adjoint", "slot bwd"), ("gate_", "slot bwd"),
)


def part_of(kernel_name):
    """The NHA part a CUDA kernel belongs to; torch's own kernels are glue."""
    for fragment, part in _PARTS:
        if fragment in kernel_name:
            return part
    return "torch glue (copies, casts, adds)"


def _prepare_fla_tuning():
    """Sets up fla's autotuning from the environment; returns the row tag.

    FLA_FIRST_CONFIG=1: one config per kernel, no tuning ("[untuned]", an
    upper bound). Otherwise fla's own autotuning, organised to fit a GPU
    round (fla compiles every config of every kernel on its first call:
    minutes, one config after another):

    - FLA_TUNE_SHARD="i/n": this process tunes only every n-th config
      (from the i-th) of each kernel, compiling them into Triton's disk
      cache, and writes each kernel's timings to FLA_SHARD_TIMINGS. n such
      processes compile all configs in parallel (their timings share the
      GPU, so they only rank candidates).
    - FLA_TUNE_CANDIDATES (comma list of shard timing files): a kernel not
      tuned yet is tuned over the FLA_TUNE_TOP (default 3) fastest configs
      of all shards, timed again here, alone.
    - FLA_TUNED_CONFIGS (comma list): configs chosen earlier (same card and
      software) are used as they are; FLA_RECORD_CONFIGS: every config
      chosen here is written there.
    - FLA_UNTUNED_FALLBACK=1: a kernel with nothing of the above takes its
      first config instead of a full tuning (bounded time; the rows then
      say how many kernels were left untuned).

    fla's tuning keys hold head counts, head dims and chunk sizes, never T,
    so the configs chosen at T=4096 are the ones fla picks at 65536.
    """
    if os.environ.get("FLA_FIRST_CONFIG") == "1":
        _first_config_only()
        return " [untuned]"
    shard = os.environ.get("FLA_TUNE_SHARD", "")
    _patch_autotuner(
        record=os.environ.get("FLA_RECORD_CONFIGS", ""),
        replay=_json_files(os.environ.get("FLA_TUNED_CONFIGS", "")),
        shard=tuple(int(x) for x in shard.split("/")) if shard else None,
        shard_timings=os.environ.get("FLA_SHARD_TIMINGS", ""),
        candidates=_json_files(os.environ.get("FLA_TUNE_CANDIDATES", ""),
                               merge=True),
        top=int(os.environ.get("FLA_TUNE_TOP", "3")),
        fallback=os.environ.get("FLA_UNTUNED_FALLBACK") == "1")
    return " [autotuned]"


# Kernels (tuning entries) of this process that fell back to their first
# config (FLA_UNTUNED_FALLBACK=1 and nothing to tune them from).
FLA_UNTUNED = set()


def _fla_tag(tag):
    """The row tag, naming kernels left untuned."""
    if FLA_UNTUNED:
        return f" [autotuned but {len(FLA_UNTUNED)} kernels untuned]"
    return tag


def _json_files(paths, merge=False):
    """The union of JSON dicts in a comma list of files (missing ones
    skipped); with `merge`, list values of one key are concatenated."""
    found = {}
    for path in (p for p in paths.split(",") if p):
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for key, value in json.load(f).items():
                if merge:
                    found.setdefault(key, []).extend(value)
                else:
                    found[key] = value
    return found


def _tuning_key(tuner, args, kwargs):
    """The key Triton's Autotuner.run files a tuned config under."""
    named = {**dict(zip(tuner.arg_names, args)), **kwargs}
    named = {k: v for k, v in named.items() if k in tuner.arg_names}
    key = [named[k] for k in tuner.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


def _config_dict(config):
    return {k: v for k, v in config.__dict__.items() if k != "pre_hook"}


def _patch_autotuner(record, replay, shard, shard_timings, candidates, top,
                     fallback):
    """Patches Triton's Autotuner.run as `_prepare_fla_tuning` describes;
    files are rewritten after each kernel (a killed process keeps what it
    tuned)."""
    from triton import Config
    from triton.runtime import autotuner

    if getattr(autotuner.Autotuner, "nha_patched", False):
        return
    chosen, timings = {}, {}
    original = autotuner.Autotuner.run

    def dump(path, found):
        with open(path, "w") as f:
            json.dump(found, f, indent=1, default=str)

    def run(self, *args, **kwargs):
        key = _tuning_key(self, args, kwargs)
        entry = f"{self.base_fn.__name__} {json.dumps(key, default=str)}"
        everything = getattr(self, "nha_all_configs", None) or self.configs
        self.nha_all_configs = everything
        fresh = len(everything) > 1 and key not in self.cache
        if fresh and entry in replay:
            self.cache[key] = Config(**replay[entry])
        elif fresh and shard:
            index, count = shard
            part = everything[index::count]
            if len(part) < 2:  # Triton times nothing below two configs
                part = [everything[(index + j) % len(everything)]
                        for j in range(2)]
            self.configs = part
        elif fresh and entry in candidates:
            ranked = sorted(candidates[entry], key=lambda ct: ct[1])
            picked = []
            for config, _ in ranked:
                if config not in picked:
                    picked.append(config)
            self.configs = [Config(**c) for c in picked[:top]]
            if len(self.configs) == 1:
                self.cache[key] = self.configs[0]
        elif fresh and fallback:
            FLA_UNTUNED.add(entry)
            self.cache[key] = everything[0]
        result = original(self, *args, **kwargs)
        if fresh and shard and shard_timings and hasattr(
                self, "configs_timings"):
            timings[entry] = [[_config_dict(c), t[0] if isinstance(
                t, (list, tuple)) else t] for c, t in
                self.configs_timings.items()]
            dump(shard_timings, timings)
        if fresh and record and key in self.cache and (
                entry not in FLA_UNTUNED):
            chosen[entry] = _config_dict(self.cache[key])
            dump(record, {**replay, **chosen})
        return result

    autotuner.Autotuner.run = run
    autotuner.Autotuner.nha_patched = True


def _first_config_only():
    """fla autotunes every kernel on its first call (compiling every config:
    over 110 s at T=4096 on the GPU host). With FLA_FIRST_CONFIG=1 every
    Triton autotuner keeps only its first config: no tuning, so these rows
    are an upper bound on fla's time, labelled as such."""
    from triton.runtime import autotuner

    if getattr(autotuner.Autotuner, "first_only", False):
        return
    original = autotuner.Autotuner.__init__

    def first_only(self, fn, arg_names, configs, *args, **kwargs):
        original(self, fn, arg_names, list(configs)[:1], *args, **kwargs)

    autotuner.Autotuner.__init__ = first_only
    autotuner.Autotuner.first_only = True


def _nha_training_step(length, **options):
    """One NHA forward+backward at the table's shapes, run once (compiled);
    `options` go to `triton_nha`."""
    import torch

    from keras_nha.kernels import state as state_lib
    from keras_nha.kernels.triton.sequence import triton_nha

    q, k, v, g = _inputs(length)
    state = state_lib.zero_state(B, H, D, D, M, min(W, length), "bfloat16")

    def step():
        out, _ = triton_nha(q, k, v, g, window_size=W, scale=D ** -0.5,
                            window_query=q, window_key=k, padding_mask=None,
                            state=state, **options)
        torch.autograd.grad(out, (q, k, v, g), torch.ones_like(out))

    step()
    torch.cuda.synchronize()
    return step


def nha_breakdown(length):
    """CUDA time per kernel of one NHA forward+backward, and per part."""
    import torch

    step = _nha_training_step(length)
    with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    totals = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] = totals.get(event.name, 0.0) + (
                event.device_time_total / 3 / 1000)
    parts = {}
    for name, ms in totals.items():
        parts[part_of(name)] = parts.get(part_of(name), 0.0) + ms
    kernels = dict(sorted(totals.items(), key=lambda kv: -kv[1])[:20])
    # CPU time to enqueue one step (nothing in it waits for the GPU): when
    # it exceeds the kernels' time, the wall time is the CPU's.
    began = time.perf_counter()
    for _ in range(5):
        step()
    host_ms = (time.perf_counter() - began) / 5 * 1000
    torch.cuda.synchronize()
    return {"kernels": kernels, "host_ms": host_ms,
            "parts": dict(sorted(parts.items(), key=lambda kv: -kv[1]))}


def host_profile(length, steps=20, top=30):
    """Where the CPU time of one NHA forward+backward goes (cProfile over
    `steps` steps, GPU work left to run behind): Triton's launcher, torch
    ops, autograd. Returns the table as text."""
    import cProfile
    import io
    import pstats

    import torch

    step = _nha_training_step(length)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stateless = host_split(_nha_training_step(length, return_state=False),
                           steps)
    return (f"host profile, T={length}, {steps} fwd+bwd steps:\n"
            + host_split(step, steps) + "\nreturn_state=False: " + stateless
            + "\n" + "\n".join(
                line for line in text.getvalue().splitlines()
                if line.strip()))


def host_numbers(step, steps=10, jit=True):
    """CPU ms to enqueue one step, without a profiler: "cached" as is,
    "jit" with every launch through Triton's JIT, "stubbed" with every
    Triton launch replaced by a no-op (torch ops, autograd and Python
    only), and "launches" per step. Each the best of three rounds of
    `steps` steps (short rounds: the GPU's queue must not fill up)."""
    import torch
    from triton.runtime.jit import JITFunction

    def enqueue_ms():
        torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(steps):
            step()
        spent = (time.perf_counter() - began) / steps * 1000
        torch.cuda.synchronize()
        return spent

    launches = [0]
    run = JITFunction.run

    def counted(self, *args, **kwargs):
        launches[0] += 1

    found = {"cached": min(enqueue_ms() for _ in range(3))}
    os.environ["KERAS_NHA_TRITON_FAST_LAUNCH"] = "0"
    try:
        if jit:
            found["jit"] = min(enqueue_ms() for _ in range(3))
        JITFunction.run = counted
        try:
            found["stubbed"] = min(enqueue_ms() for _ in range(3))
        finally:
            JITFunction.run = run
    finally:
        os.environ.pop("KERAS_NHA_TRITON_FAST_LAUNCH")
    found["launches"] = launches[0] / (3 * steps)
    return found


def host_split(step, steps=20):
    """`host_numbers` as one line of text, with the CPU cost per launch."""
    found = host_numbers(step, min(steps, 10))
    full, jit, bare = found["cached"], found["jit"], found["stubbed"]
    count = max(found["launches"], 1)
    return (f"CPU per fwd+bwd step: {full:.3f} ms (cached launches); "
            f"{jit:.3f} ms with Triton's JIT launches "
            f"(KERAS_NHA_TRITON_FAST_LAUNCH=0); without the Triton launches "
            f"{bare:.3f} ms; {count:.0f} launches, "
            f"{(full - bare) / count * 1000:.1f} us each cached, "
            f"{(jit - bare) / count * 1000:.1f} us through the JIT")


def three_ways(step, calls=50):
    """fwd+bwd ms of `step` timed three ways, so that no verdict hangs on
    one method: "do_bench" (median, Triton's, L2 flushed before each
    call), "events" (median of CUDA events around each of `calls`
    back-to-back calls) and "loop" (`calls` calls, one event pair and one
    sync around all of them: ms per call). When the CPU enqueues faster
    than the GPU runs, all three are GPU time; else they include the
    GPU's wait for the CPU."""
    import statistics

    import torch

    found = {"do_bench": _bench(step)}
    pairs = [(torch.cuda.Event(enable_timing=True),
              torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    torch.cuda.synchronize()
    for start, end in pairs:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    found["events"] = statistics.median(s.elapsed_time(e) for s, e in pairs)
    first, last = pairs[0][0], pairs[0][1]
    torch.cuda.synchronize()
    first.record()
    for _ in range(calls):
        step()
    last.record()
    torch.cuda.synchronize()
    found["loop"] = first.elapsed_time(last) / calls
    return found


def eager_rows(length=4096, trace=None):
    """The fwd+bwd comparison at T=`length` as a user runs it, eagerly:
    SDPA causal, the public op (no returned state: what a user gets), the
    public op with return_state, the kernels called directly, and CUDA
    graphs; each timed by `three_ways`, with the CPU time to enqueue one
    call ("cpu") and for NHA the same with every Triton launch stubbed
    ("cpu_stubbed"). Rows are yielded one by one (a killed job keeps the
    ones it measured). With `trace`, a Chrome trace of three steps of the
    public op is written there."""
    import torch
    from torch.nn.attention import SDPBackend
    from torch.nn.attention import sdpa_kernel

    import keras_nha
    from keras_nha.kernels import state as state_lib
    from keras_nha.kernels.triton.sequence import triton_nha

    q, k, v, g = _inputs(length)
    nha_inputs = (q, k, v, g)
    state = state_lib.zero_state(B, H, D, D, M, min(W, length), "bfloat16")
    heads = _heads_first(length)

    def sdpa(backend):
        def forward():
            if backend is None:
                return torch.nn.functional.scaled_dot_product_attention(
                    *heads, is_causal=True)
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(
                    *heads, is_causal=True)
        return forward

    def public(**options):
        def forward():
            out = keras_nha.ops.native_hybrid_attention(q, k, v, g, W,
                                                        **options)
            return out[0] if options.get("return_state") else out
        return forward

    def kernels(return_state):
        def forward():
            return triton_nha(q, k, v, g, window_size=W, scale=D ** -0.5,
                              window_query=q, window_key=k, padding_mask=None,
                              state=state, return_state=return_state)[0]
        return forward

    variants = (
        ("SDPA causal (flash)", sdpa(SDPBackend.FLASH_ATTENTION), heads,
         False),
        ("NHA public op (auto, no state)", public(), nha_inputs, True),
        ("SDPA causal (torch picks the backend)", sdpa(None), heads, False),
        ("NHA public op (triton)", public(implementation="triton"),
         nha_inputs, True),
        ("NHA public op, return_state", public(return_state=True),
         nha_inputs, True),
        ("NHA kernels, no returned state", kernels(False), nha_inputs, True),
        ("NHA kernels, returned state", kernels(True), nha_inputs, True),
        # Which backend torch picks (H200, torch 2.11: 0.57 ms vs flash's
        # 1.11 in s6r1).
        ("SDPA causal (cuDNN)", sdpa(SDPBackend.CUDNN_ATTENTION), heads,
         False),
        ("SDPA causal (memory-efficient)",
         sdpa(SDPBackend.EFFICIENT_ATTENTION), heads, False),
    )
    if os.environ.get("NHA_BENCH_EAGER_REVERSED") == "1":  # order effects
        variants = variants[::-1]
    # Every variant runs 20 times before any is timed (the row measured
    # first was 0.15-0.3 ms slower than the same call measured second in
    # s6r1: compiles, allocator growth, lazy initialisation).
    steps = {}
    for name, forward, inputs, _ in variants:
        try:
            steps[name] = _fwd_bwd(forward, inputs)
            for _ in range(20):
                steps[name]()
        except RuntimeError as error:  # an SDPA backend that cannot serve
            print(f"{name}: {error}"[:200], flush=True)
    torch.cuda.synchronize()
    for name, forward, inputs, is_nha in variants:
        if name not in steps:
            continue
        step = steps[name]
        found = three_ways(step)
        if is_nha:
            cpu = host_numbers(step, jit=False)
            found.update(cpu=cpu["cached"], cpu_stubbed=cpu["stubbed"],
                         launches=cpu["launches"])
        else:
            found["cpu"] = host_numbers(step, jit=False)["cached"]
        yield name, found
    try:
        yield "SDPA default backend: CUDA kernels", {
            "kernels": _kernel_names(_fwd_bwd(sdpa(None), heads))}
    except Exception as error:  # the rows after it still count
        print(f"SDPA kernel names: {error!r}"[:200], flush=True)
    for name, forward in (("NHA public op, CUDA graph", public()),
                          ("SDPA causal (flash), CUDA graph",
                           sdpa(SDPBackend.FLASH_ATTENTION))):
        inputs = heads if name.startswith("SDPA") else nha_inputs
        replay = _graphed(_fwd_bwd(forward, inputs))
        yield name, three_ways(replay)
    if trace:
        step = _fwd_bwd(public(), nha_inputs)
        with torch.profiler.profile(activities=[
                torch.profiler.ProfilerActivity.CPU,
                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        prof.export_chrome_trace(trace)


def _kernel_names(step):
    """The CUDA kernels one call of `step` runs (names, in order)."""
    import torch

    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA]
    return "; ".join(dict.fromkeys(n[:90] for n in names))


def eager_table(found, length=4096):
    """`eager_rows`' results as text, with the verdict against SDPA."""
    lines = [f"fwd+bwd at T={length}, eager as a user runs it (ms per call; "
             "do_bench: median, L2 flushed; events: median per call, "
             "back to back; loop: 50 calls, one sync; cpu: CPU time to "
             "enqueue one call; stubbed: the same with every Triton launch "
             "a no-op)",
             f"{'row':40s} {'do_bench':>9s} {'events':>8s} {'loop':>8s} "
             f"{'cpu':>7s} {'stubbed':>8s} {'launches':>8s}"]
    for name, row in found.items():
        if "kernels" in row:
            lines.append(f"{name}: {row['kernels']}")
            continue
        cells = [f"{row[key]:9.3f}" if key in row else f"{'':9s}"
                 for key in ("do_bench",)]
        cells += [f"{row[key]:8.3f}" if key in row else f"{'':8s}"
                  for key in ("events", "loop")]
        cells += [f"{row[key]:7.3f}" if key in row else f"{'':7s}"
                  for key in ("cpu",)]
        cells += [f"{row[key]:8.3f}" if key in row else f"{'':8s}"
                  for key in ("cpu_stubbed",)]
        cells += [f"{row['launches']:8.0f}" if "launches" in row
                  else f"{'':8s}"]
        lines.append(f"{name:40s} " + " ".join(cells))
    for peer in ("SDPA causal (flash)",
                 "SDPA causal (torch picks the backend)"):
        sdpa = found.get(peer)
        for name in ("NHA public op (auto, no state)",
                     "NHA public op (triton)", "NHA public op, CUDA graph"):
            if sdpa and name in found:
                ratios = ", ".join(
                    f"{key} {found[name][key] / sdpa[key]:.2f}x"
                    for key in ("do_bench", "events", "loop"))
                lines.append(f"{name} / {peer}: {ratios}")
    return "\n".join(lines)


def decode_rows(batch=8, contexts=(4096, 65536)):
    """ms per one-token step; SDPA reads the whole KV cache."""
    import torch

    from keras_nha.kernels import state as state_lib
    from keras_nha.kernels.triton.step import triton_nha_step

    rows = {}
    gen = torch.Generator(device="cuda").manual_seed(1)

    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=gen)

    longest = max(contexts)
    q1 = rand(batch, H, 1, D)
    cache_k, cache_v = rand(batch, H, longest, D), rand(batch, H, longest, D)
    rows[f"SDPA decode over {longest} cached tokens"] = _bench(
        lambda: torch.nn.functional.scaled_dot_product_attention(
            q1, cache_k, cache_v))
    del cache_k, cache_v

    q, k, v = rand(batch, H, D), rand(batch, H, D), rand(batch, H, D)
    g = torch.nn.functional.logsigmoid(rand(batch, H, M,
                                            dtype=torch.float32)) / 8
    for context in contexts:
        state = state_lib.zero_state(batch, H, D, D, M, W, "bfloat16")
        for name in ("keys", "window_keys", "values"):
            state[name] = rand(*state[name].shape)
        state["slot_keys"] = rand(batch, H, D, M, dtype=torch.float32)
        state["slot_values"] = rand(batch, H, M, D, dtype=torch.float32)
        state["log_forget_gates"] = torch.nn.functional.logsigmoid(
            rand(*state["log_forget_gates"].shape, dtype=torch.float32)) / 8
        state["mask"] = torch.ones_like(state["mask"])
        state["position"] = torch.tensor(context, device="cuda",
                                         dtype=torch.int32)
        kwargs = dict(window_size=W, scale=D ** -0.5, window_query=q,
                      window_key=k, padding_mask=None)
        rows[f"NHA step, context {context} (functional)"] = _bench(
            lambda: triton_nha_step(q, k, v, g, state, **kwargs))
        graph = torch.cuda.CUDAGraph()
        triton_nha_step(q, k, v, g, state, **kwargs)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            triton_nha_step(q, k, v, g, state, **kwargs)
        rows[f"NHA step, context {context} (functional, CUDA graph)"] = (
            _bench(graph.replay))
        rows[f"NHA step, context {context} (in place)"] = _bench(
            lambda: triton_nha_step(q, k, v, g, state, inplace=True,
                                    **kwargs))
        graph = torch.cuda.CUDAGraph()
        triton_nha_step(q, k, v, g, state, inplace=True, **kwargs)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            triton_nha_step(q, k, v, g, state, inplace=True, **kwargs)
        rows[f"NHA step, context {context} (in place, CUDA graph)"] = _bench(
            graph.replay)
    return rows


def compile_report(only="", dtype="bfloat16"):
    """Compiles every kernel of one NHA forward+backward and decode step for
    sm_90 on this machine (no GPU needed) and prints registers and spills
    (cuobjdump's STACK) per kernel. Launches are recorded, not run, and
    specialised with the JIT's own rules (pointer and integer alignment):
    without those hints loads are not vectorised or pipelined and the
    register counts mean nothing."""
    import re
    import subprocess
    import tempfile

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction
    from triton.runtime.jit import create_function_from_signature

    from keras_nha.kernels import state as state_lib
    from keras_nha.kernels.triton import common
    from keras_nha.kernels.triton.sequence import triton_nha
    from keras_nha.kernels.triton.step import triton_nha_step

    # Launches are recorded through JITFunction.run: not the cached launcher.
    os.environ["KERAS_NHA_TRITON_FAST_LAUNCH"] = "0"
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    launches = {}

    def record(fn, *args, grid, warmup, **kwargs):
        binder = create_function_from_signature(fn.signature, fn.params,
                                                backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constants, attrs = fn._pack_args(
            backend, kwargs, bound, specialization, options)
        shown = {k: v for k, v in kwargs.items()
                 if k in ("num_warps", "num_stages", "maxnreg")}
        key = (fn.fn.__name__, str(signature), str(constants), str(attrs),
               str(shown))
        launches[key] = (fn, ASTSource(fn, signature, constants, attrs),
                         options, shown)

    JITFunction.run = record
    common.interpreting = lambda: False
    length = 1024
    q, k, v = (torch.randn(B, length, H, D, dtype=getattr(torch, dtype),
                           requires_grad=True) for _ in range(3))
    g = (-torch.rand(B, length, H, M)).requires_grad_(True)
    state = state_lib.zero_state(B, H, D, D, M, W, dtype)
    out, _ = triton_nha(q, k, v, g, window_size=W, scale=D ** -0.5,
                        window_query=q, window_key=k, padding_mask=None,
                        state=state)
    out.sum().backward()
    triton_nha_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], state, window_size=W,
                    scale=D ** -0.5, window_query=q[:, 0],
                    window_key=k[:, 0], padding_mask=None)
    dump = os.path.join(os.path.dirname(triton.__file__),
                        "backends/nvidia/bin/cuobjdump")
    for fn, source, options, shown in launches.values():
        if only and fn.fn.__name__ not in only.split(","):
            continue
        began = time.time()
        kernel = triton.compile(source, target=target,
                                options=options.__dict__)
        shown["compile_s"] = round(time.time() - began, 1)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([dump, "--dump-resource-usage", f.name],
                                   capture_output=True, text=True).stdout
        found = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
        print(f"{fn.fn.__name__:24s} registers {found.group(1):>4s} "
              f"spill/stack bytes {found.group(2):>5s} {shown}", flush=True)


def _table(result):
    lines = []
    card = result["device"]
    ceil = result["ceilings"]
    lines.append(f"device: {card}; torch {result['torch']}, triton "
                 f"{result['triton']}; bf16 matmul "
                 f"{ceil['matmul_bf16_tflops']:.0f} TFLOP/s, copy "
                 f"{ceil['copy_gbs']:.0f} GB/s (read + write)")
    lines.append(f"B={B} H={H} K=V={D} M={M} W={W} bf16; median ms; TFLOP/s "
                 "on counted FLOPs (fwd+bwd = 3.5 x fwd); NHA tile overrides: "
                 f"[{result.get('blocks') or 'none'}]")
    if result.get("plan_check"):
        lines.append(result["plan_check"])
    if result.get("eager"):
        lines.append(eager_table(result["eager"],
                                 result.get("eager_length", 4096)))
    for config, found in result.get("tuning_short", {}).items():
        lines.append(f"  short tuning [{config}]: CUDA graph "
                     f"{found['graph']:.3f} ms, eager {found['eager']:.3f} "
                     f"ms, change vs defaults {found.get('change', 0):.1e}")
    for config, found in result.get("tuning", {}).items():
        if isinstance(found, list):  # older files: (fwd, fwd+bwd)
            found = {"fwd": found[0], "fwd+bwd": found[1], "parts": {}}
        lines.append(f"  tuning [{config}]: fwd {found['fwd']:.3f} ms, "
                     f"fwd+bwd {found['fwd+bwd']:.3f} ms; " + ", ".join(
                         f"{k} {v:.3f}" for k, v in found["parts"].items()))
    header = f"{'row':34s} {'T':>6s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} " \
             f"{'fwd TF/s':>9s} {'f+b TF/s':>9s} {'% matmul':>8s}"
    lines.append(header)
    for name, per_length in result["rows"].items():
        for length, (fwd, both, flops) in sorted(per_length.items(),
                                                 key=lambda kv: int(kv[0])):
            f_rate = flops / fwd / 1e9
            b_rate = 3.5 * flops / both / 1e9
            lines.append(f"{name:34s} {int(length):6d} {fwd:9.3f} "
                         f"{both:11.3f} {f_rate:9.0f} {b_rate:9.0f} "
                         f"{100 * b_rate / ceil['matmul_bf16_tflops']:7.0f}%")
    nha = next((per for name, per in result["rows"].items()
                if name.startswith("NHA")), {})
    for name, per_length in result["rows"].items():
        if name.startswith("NHA"):
            continue
        ratios = [f"T={t}: fwd {nha[t][0] / per_length[t][0]:.2f}x, "
                  f"fwd+bwd {nha[t][1] / per_length[t][1]:.2f}x"
                  for t in sorted(per_length, key=int) if t in nha]
        if ratios:
            lines.append(f"NHA time / {name}: " + "; ".join(ratios))
    for name, error in result.get("skipped", {}).items():
        lines.append(f"{name:34s} skipped: {error}")
    if result.get("decode"):
        lines.append("decode, B=8, one token (ms):")
        for name, ms in result["decode"].items():
            lines.append(f"  {name:54s} {ms:8.4f}")
    if result.get("host_profile"):
        lines.append(result["host_profile"])
    for length, found in sorted(result.get("breakdowns", {}).items(),
                                key=lambda kv: int(kv[0])):
        total = sum(found["parts"].values())
        host = found.get("host_ms")
        host = f", {host:.3f} ms of CPU time to launch" if host else ""
        lines.append(f"NHA fwd+bwd CUDA time at T={length}: {total:.3f} ms "
                     f"of kernels{host}; per part (ms):")
        for name, ms in found["parts"].items():
            lines.append(f"  {name:40s} {ms:8.3f} {100 * ms / total:5.1f}%")
        lines.append("  per kernel (ms):")
        for name, ms in found["kernels"].items():
            lines.append(f"    {name[:58]:58s} {ms:8.3f}")
    return "\n".join(lines)


def _plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, title in enumerate(("forward", "forward + backward")):
        ax = axes[index]
        for name, per_length in result["rows"].items():
            lengths = sorted(int(t) for t in per_length)
            ax.plot(lengths, [per_length[str(t)][index] for t in lengths],
                    marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (tokens)")
        ax.set_ylabel("median ms")
        ax.set_title(f"{title}, {result['device']}")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    if result.get("tuning"):
        _plot_tuning(result, path.replace(".png", "_tuning.png"), plt)
    if result.get("eager"):
        _plot_eager(result, path.replace(".png", "_eager.png"), plt)


def _plot_eager(result, path, plt):
    """The eager comparison at one T: each row's fwd+bwd ms by the three
    timing methods, its CPU time per call (and with launches stubbed), and
    SDPA causal (flash) as a line."""
    rows = result["eager"]
    keys = ("do_bench", "events", "loop", "cpu", "cpu_stubbed")
    names = [n for n in rows if "do_bench" in rows[n]]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(names) + 1.8))
    height = 0.8 / len(keys)
    for index, key in enumerate(keys):
        ax.barh([i + index * height for i in range(len(names))],
                [rows[n].get(key, 0.0) for n in names], height=height,
                label=key, hatch="//" if key.startswith("cpu") else None)
    sdpa = rows.get("SDPA causal (flash)", {}).get("do_bench")
    if sdpa:
        ax.axvline(sdpa, color="black", linestyle="--", linewidth=1,
                   label="SDPA causal (flash), do_bench")
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(names))], names,
                  fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per fwd+bwd call (cpu: CPU time to enqueue one)")
    ax.set_title(f"T={result.get('eager_length', 4096)} eager, "
                 f"{result['device']}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot_tuning(result, path, plt):
    """Stacked per-part CUDA time of NHA fwd+bwd under each tuning value
    (the default first, from the breakdown at the same T when present)."""
    variants = dict(result["tuning"])
    length = str(result.get("tune_length", ""))
    if length in result.get("breakdowns", {}):
        variants = {"default": {"parts": result["breakdowns"][length][
            "parts"]}, **variants}
    parts = sorted({p for v in variants.values() for p in v.get("parts", {})})
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(variants) + 1.5))
    names = list(variants)
    left = [0.0] * len(names)
    for part in parts:
        widths = [variants[n].get("parts", {}).get(part, 0.0) for n in names]
        ax.barh(names, widths, left=left, label=part)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("CUDA ms per NHA fwd+bwd (profiler)")
    ax.set_title(f"tile variants at T={length or '?'}, {result['device']}")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _measure(args, tuning):
    """Most important first, each row saved as soon as it is measured (a job
    with a wall-clock limit keeps what it got): NHA at every length, its
    per-kernel breakdowns, decode, then the peers one by one (fla last,
    shortest T first: its first call at each length autotunes)."""
    import torch
    import triton

    start = time.time()
    result = {"device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "triton": triton.__version__,
              "ceilings": _ceilings(), "rows": {}, "skipped": {},
              "blocks": os.environ.get("KERAS_NHA_TRITON_BLOCKS", ""),
              "tuning": tuning, "breakdowns": {},
              "tune_length": args.tune_length}
    print(f"{result['device']}: {result['ceilings']}", flush=True)
    reused = {}
    if args.reuse:
        with open(args.reuse) as f:
            reused = json.load(f)
        if reused.get("device") != result["device"]:
            print(f"not reusing rows measured on {reused.get('device')}")
            reused = {}

    def save():
        if args.json:  # partial results survive a timeout
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    def late(what):
        if args.deadline and time.time() - start > args.deadline:
            result["skipped"][what] = "deadline"
            print(f"skipped {what}: past the deadline", flush=True)
            return True
        return False

    def run_rows(rows_fn, length):
        if late(f"{rows_fn.__name__} T={length}"):
            return
        began = time.time()
        try:
            rows = rows_fn(length)
        except Exception as error:  # a missing peer stays visible
            result["skipped"][f"{rows_fn.__name__} T={length}"] = (
                f"{type(error).__name__}: {str(error)[:200]}")
            print(f"[{rows_fn.__name__} T={length}] failed: {error!r}",
                  flush=True)
            return
        finally:
            torch.cuda.empty_cache()
        for name, values in rows.items():
            result["rows"].setdefault(name, {})[str(length)] = values
        print(f"[{rows_fn.__name__} T={length}: {time.time() - began:.0f}s,"
              f" at {time.time() - start:.0f}s] " + "; ".join(
                  f"{n}: fwd {f:.3f} ms, fwd+bwd {b:.3f} ms"
                  for n, (f, b, _) in rows.items()), flush=True)
        save()

    if args.eager:
        _eager_first(args, result, save)
    if args.tune_short and not late("short tuning"):
        _tune_short(args, result, late, save)
    lengths = [int(t) for t in args.lengths.split(",") if t]
    for length in lengths:
        run_rows(nha_rows, length)
    for length in (int(t) for t in args.breakdown.split(",") if t):
        if late(f"breakdown T={length}"):
            continue
        result["breakdowns"][str(length)] = found = nha_breakdown(length)
        print(f"[breakdown T={length}] {found['parts']}", flush=True)
        save()
    if args.host_profile and not late("host profile"):
        try:
            result["host_profile"] = host_profile(args.host_profile)
        except Exception as error:  # the rows after it still count
            result["host_profile"] = f"host profile failed: {error!r}"[:300]
        print(result["host_profile"], flush=True)
        save()
    if not args.no_decode and not late("decode"):
        result["decode"] = decode_rows()
        print(f"[decode] {result['decode']}", flush=True)
        save()
    peers = {"sdpa": sdpa_rows, "flex": flex_rows, "fla": fla_rows}
    for peer in args.peers.split(","):
        if peer == "tune":
            _tune(args, result, late, save)
            continue
        if peer not in peers:
            continue
        order = sorted(lengths) if peer == "fla" else lengths
        for length in order:
            old = {name: per[str(length)]
                   for name, per in reused.get("rows", {}).items()
                   if str(length) in per and not name.startswith("NHA")
                   and _peer_of(name) == peer}
            if old:
                for name, values in old.items():
                    result["rows"].setdefault(name, {})[str(length)] = values
                result.setdefault("reused", []).append(f"{peer} T={length}")
                print(f"[{peer} T={length}] reused from {args.reuse}")
                save()
                continue
            run_rows(peers[peer], length)
    return result


def plan_check(length=4096):
    """Output and gradients of the public op at T=`length`: first call
    (records the launch plan), second (replays it), and through Triton's
    JIT launches (KERAS_NHA_TRITON_FAST_LAUNCH=0); returns a line of text
    saying whether all three are bit-identical."""
    import torch

    import keras_nha

    q, k, v, g = _inputs(length, seed=3)
    upstream = torch.randn_like(q)

    def outputs():
        out = keras_nha.ops.native_hybrid_attention(q, k, v, g, W)
        return [out.detach()] + list(
            torch.autograd.grad(out, (q, k, v, g), upstream))

    recorded, replayed = outputs(), outputs()
    os.environ["KERAS_NHA_TRITON_FAST_LAUNCH"] = "0"
    try:
        jit = outputs()
    finally:
        os.environ.pop("KERAS_NHA_TRITON_FAST_LAUNCH")
    same = all(torch.equal(a, b) and torch.equal(a, c)
               for a, b, c in zip(jit, recorded, replayed))
    finite = all(bool(torch.isfinite(x).all()) for x in jit)
    return (f"launch plans at T={length}: first call, replayed call and "
            f"Triton's JIT launches {'bit-identical' if same else 'DIFFER'}"
            f" (output and 4 gradients{', all finite' if finite else ', NOT FINITE'})")


def _eager_first(args, result, save):
    """`eager_rows` at --eager, printed and saved row by row."""
    found = result.setdefault("eager", {})
    result["eager_length"] = args.eager
    try:
        result["plan_check"] = plan_check(args.eager)
    except Exception as error:  # the rows still count
        result["plan_check"] = f"plan check failed: {error!r}"[:300]
    print(result["plan_check"], flush=True)
    began = time.time()
    try:
        for name, row in eager_rows(args.eager, args.trace):
            found[name] = row
            print(f"[eager T={args.eager}, {time.time() - began:.0f}s] "
                  f"{name}: " + ", ".join(
                      f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in row.items()),
                  flush=True)
            save()
    except Exception as error:  # the rows after it still count
        result["skipped"]["eager"] = f"{type(error).__name__}: {error}"[:300]
        print(f"eager rows failed: {error!r}"[:300], flush=True)
    print(eager_table(found, args.eager), flush=True)


def _tune_short(args, result, late, save):
    """Tile variants at --eager T (default 4096): fwd+bwd of the kernels
    replayed from a CUDA graph (their GPU time) and of the public op
    eagerly, under each KERAS_NHA_TRITON_BLOCKS value of --tune-short."""
    import keras_nha

    import torch

    length = args.eager or 4096
    q, k, v, g = _inputs(length)
    found = result.setdefault("tuning_short", {})
    upstream = torch.randn_like(q)  # [B, T, H, V]: V = K here

    def forward():
        return keras_nha.ops.native_hybrid_attention(q, k, v, g, W)

    def outputs():
        out = forward()
        return [out.detach()] + list(
            torch.autograd.grad(out, (q, k, v, g), upstream))

    reference = None
    for config in [""] + [c for c in args.tune_short.split(";") if c]:
        if late(f"short tune [{config}]"):
            continue
        try:
            with _switched(config):
                got = outputs()
                step = _fwd_bwd(forward, (q, k, v, g))
                graph = _bench(_graphed(step))
                eager = _bench(step)
        except Exception as error:  # a config that does not compile
            print(f"short tune [{config}]: {error!r}"[:300], flush=True)
            continue
        reference = reference or got
        # Against the defaults: 0 for a pure scheduling change, ~1e-3 for
        # other tiles (bf16 outputs, another summation order).
        change = max(float((a.float() - b.float()).abs().max()
                           / b.float().abs().max().clamp_min(1e-30))
                     for a, b in zip(got, reference))
        found[config or "defaults"] = {"graph": graph, "eager": eager,
                                       "change": change}
        print(f"[short tune T={length} [{config or 'defaults'}]] CUDA graph "
              f"{graph:.3f} ms, eager {eager:.3f} ms (fwd+bwd, public op); "
              f"largest change vs defaults {change:.1e}", flush=True)
        save()


def _tune(args, result, late, save):
    """NHA fwd+bwd at --tune-length under each KERAS_NHA_TRITON_BLOCKS value
    of --tune, with the per-part breakdown (parts are independent, so the
    best value of each part can be combined)."""
    for config in (c for c in args.tune.split(";") if c):
        if late(f"tune [{config}]"):
            continue
        began = time.time()
        try:
            with _switched(config):
                rows = nha_rows(args.tune_length, graphs=False)
                fwd, both, _ = rows["NHA Triton (M=64, W=512)"]
                parts = nha_breakdown(args.tune_length)["parts"]
        except Exception as error:  # a config that does not compile
            print(f"tune [{config}]: {error!r}"[:300], flush=True)
            continue
        result["tuning"][config] = {"fwd": fwd, "fwd+bwd": both,
                                    "parts": parts}
        print(f"[tune T={args.tune_length} [{config}]: "
              f"{time.time() - began:.0f}s] fwd {fwd:.3f} ms, fwd+bwd "
              f"{both:.3f} ms; " + ", ".join(
                  f"{k} {v:.3f}" for k, v in parts.items()), flush=True)
        save()


@contextlib.contextmanager
def _switched(config):
    """The environment of one --tune value (`_config_env`) while inside."""
    switches = _config_env(config)
    saved = {name: os.environ.get(name) for name in switches}
    os.environ.update(switches)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def _config_env(config):
    """Environment for one --tune value: upper-case names are environment
    switches, the rest tile fields (appended to KERAS_NHA_TRITON_BLOCKS)."""
    items = [i for i in config.split(",") if i]
    env = dict(i.split("=") for i in items if i[:1].isupper())
    tiles = [i for i in items if not i[:1].isupper()]
    fixed = os.environ.get("KERAS_NHA_TRITON_BLOCKS", "")
    env["KERAS_NHA_TRITON_BLOCKS"] = ",".join(c for c in [fixed] + tiles
                                              if c)
    return env


def warm(args):
    """Compiles (fills Triton's and Inductor's disk caches) without timing
    anything that matters, so that a later measuring process starts warm:
    NHA fwd+bwd under the defaults and every --tune value, the decode step,
    and with "flex" or "fla" in --warm that peer at every length (fla
    autotunes there unless FLA_FIRST_CONFIG=1; FLA_RECORD_CONFIGS keeps the
    result)."""
    import torch

    from keras_nha.kernels import state as state_lib
    from keras_nha.kernels.triton.sequence import triton_nha
    from keras_nha.kernels.triton.step import triton_nha_step

    start = time.time()
    if "nha" in args.warm:
        q, k, v, g = _inputs(1024)
        state = state_lib.zero_state(B, H, D, D, M, W, "bfloat16")
        for config in [""] + [c for c in args.tune.split(";") if c]:
            saved = dict(os.environ)
            os.environ.update(_config_env(config))
            try:
                out, _ = triton_nha(q, k, v, g, window_size=W,
                                    scale=D ** -0.5, window_query=q,
                                    window_key=k, padding_mask=None,
                                    state=state)
                torch.autograd.grad(out, (q, k, v, g), torch.ones_like(out))
            except Exception as error:  # reported; the measuring run skips
                print(f"warm [{config}]: {error!r}"[:300], flush=True)
            finally:
                os.environ.clear()
                os.environ.update(saved)
            print(f"warm nha [{config or 'default'}] at "
                  f"{time.time() - start:.0f}s", flush=True)
        step_state = state_lib.zero_state(8, H, D, D, M, W, "bfloat16")
        one = _inputs(8, grad=False)
        token = [x[0].contiguous() for x in one]  # [8, H, d]: 8 rows
        for inplace in (False, True):
            triton_nha_step(*token, step_state, window_size=W,
                            scale=D ** -0.5, window_query=token[0],
                            window_key=token[1], padding_mask=None,
                            inplace=inplace)
        torch.cuda.synchronize()
        print(f"warm decode at {time.time() - start:.0f}s", flush=True)
    for peer, rows_fn in (("flex", flex_rows), ("fla", fla_rows)):
        if peer not in args.warm:
            continue
        for length in sorted(int(t) for t in args.lengths.split(",")):
            try:
                rows_fn(length)
            except Exception as error:
                print(f"warm {peer} T={length}: {error!r}"[:300], flush=True)
            torch.cuda.empty_cache()
            print(f"warm {peer} T={length} at {time.time() - start:.0f}s",
                  flush=True)


def _peer_of(row_name):
    lowered = row_name.lower()
    for peer in ("sdpa", "flex", "fla"):
        if lowered.startswith(peer):
            return peer
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,16384,65536")
    parser.add_argument("--peers", default="sdpa,flex,fla",
                        help="comma list of sdpa, flex, fla, tune, in the "
                        "order to run them (or none)")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--breakdown", default="65536,4096",
                        help="comma list of T for the per-kernel profile")
    parser.add_argument("--host-profile", type=int, default=0,
                        help="T of a cProfile of the CPU side of NHA "
                        "fwd+bwd (0: none)")
    parser.add_argument("--deadline", type=float, default=0,
                        help="seconds after which no new row is started")
    parser.add_argument("--reuse", help="a JSON of an earlier run on the "
                        "same card: its peer rows are kept, not re-measured")
    parser.add_argument("--tune", default="",
                        help="';'-separated KERAS_NHA_TRITON_BLOCKS values: "
                        "NHA fwd+bwd and its parts at --tune-length under "
                        "each, where 'tune' stands in --peers")
    parser.add_argument("--tune-length", type=int, default=16384)
    parser.add_argument("--eager", type=int, default=0,
                        help="T of the eager fwd+bwd comparison run first "
                        "(SDPA, the public op, the kernels, CUDA graphs; "
                        "three timing methods and the CPU split; 0: none)")
    parser.add_argument("--trace", help="with --eager: write a Chrome trace "
                        "of three public-op steps here")
    parser.add_argument("--tune-short", default="",
                        help="';'-separated KERAS_NHA_TRITON_BLOCKS values "
                        "timed at --eager T (CUDA graph and eager)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a PNG of time vs T here")
    parser.add_argument("--from-json", help="re-print/plot saved results")
    parser.add_argument("--compile-report", action="store_true",
                        help="compile for sm_90 on this machine (no GPU) "
                        "and print registers and spills per kernel")
    parser.add_argument("--warm", default="",
                        help="comma list of nha, flex, fla: compile only "
                        "(fill the disk caches for a later measuring run)")
    parser.add_argument("--kernels", default="",
                        help="with --compile-report: only these kernels")
    parser.add_argument("--dtype", default="bfloat16",
                        help="with --compile-report: the inputs' dtype")
    args = parser.parse_args()
    if args.compile_report:
        compile_report(args.kernels, args.dtype)
        return
    if args.warm:
        warm(args)
        return

    tuning = {}
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
    else:
        result = _measure(args, tuning)
    print(_table(result))
    if args.json and not args.from_json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        try:
            _plot(result, args.plot)
        except ImportError as error:
            print(f"no plot: {error}")


if __name__ == "__main__":
    main()
