"""Launching compiled Triton kernels with less CPU time per call.

At short sequences an NHA forward+backward is bound by the CPU: each of its
~18 Triton launches spends tens of microseconds in Triton's JIT (binding the
arguments, specialising them, building the cache key) before the driver
call. `CachedLauncher` does that work once per call signature (and device).
It is the default since session 5 (bit-identical results on Triton 3.6 in
every GPU round of session 4); KERAS_NHA_TRITON_FAST_LAUNCH=0 restores
Triton's own launch path.

`Plan` goes further for a whole sequence of launches: inside
`with Plan.of(signature)`, where the signature fixes everything the
kernels specialise on (the caller's tensors' dtypes and alignments, the
shapes, the tiles, the ring offsets' int classes), the first run records
which compiled kernel each launch used, and later runs launch them in the
same order without building a key per launch (a few microseconds each on a
slow host; a launch whose kernel differs from the record drops the plan).
KERAS_NHA_TRITON_PLANS=0 turns plans off.
"""

import os
import threading

from triton.runtime import driver

from keras_nha.kernels.triton.common import interpreting


def _signature(arg):
    """What Triton specialises a kernel on for one argument: a tensor's
    dtype and 16-byte alignment, an int's width, == 1 and % 16."""
    if hasattr(arg, "data_ptr"):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool) or not isinstance(arg, int):
        return type(arg), arg if isinstance(arg, bool) else None
    return int, arg == 1, arg % 16 == 0, -2 ** 31 <= arg < 2 ** 31


def _key(args, tensor=None):
    """`_signature` of every argument, with the two common kinds (plain
    tensors and ints) inlined: this runs for every launch."""
    out = []
    for arg in args:
        kind = type(arg)
        if kind is tensor:
            out.append((arg.dtype, arg.data_ptr() & 15 == 0))
        elif kind is int:
            out.append((arg == 1, arg & 15 == 0,
                        -2 ** 31 <= arg < 2 ** 31))
        else:  # tensor subclasses, bools, floats, strings, None
            out.append(_signature(arg))
    return tuple(out)


class CachedLauncher:
    """`kernel[grid](*args, **kwargs)` like a JIT function, minus most of
    its CPU cost: after the first call with a given signature (argument
    dtypes, alignments, int classes, constexprs and options), the compiled
    kernel is launched directly, without Triton's binder and cache key.
    Only for kernels called with positional runtime arguments and keyword
    constexprs/options, as this package does."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid, args, kwargs):
        current_device, current_stream = _DRIVER[0]
        device = current_device()
        plan = _ACTIVE.plan
        found = plan.replay(self.fn) if plan is not None else None
        if found is None:
            # Each call site passes its keywords in one order: no sorting.
            # A compiled kernel's handle belongs to one device's context.
            key = (device, _key(args, _TENSOR[0]), tuple(kwargs.items()))
            found = self.compiled.get(key)
            if found is None:
                kernel = self.fn[grid](*args, **kwargs)
                # The parameters after the positional ones, as the key
                # fixes them (constexprs given by keyword, or defaults).
                rest = tuple(kwargs.get(p.name, p.default)
                             for p in self.fn.params[len(args):])
                self.compiled[key] = (kernel, kernel.run, rest)
                if plan is not None:
                    plan.record(self.fn, self.compiled[key])
                return kernel
            if plan is not None:
                plan.record(self.fn, found)
        kernel, run, rest = found
        run(grid[0], grid[1] if len(grid) > 1 else 1,
            grid[2] if len(grid) > 2 else 1,
            current_stream(device), kernel.function,
            kernel.packed_metadata, None, None, None, *args, *rest)
        return kernel


class Plan:
    """The compiled kernels of one launch sequence, in launch order (see
    the module docstring). Use `with Plan.of(signature):`."""

    _known = {}
    _LIMIT = 64

    def __init__(self, signature):
        self.signature = signature
        self.entries = []
        self.complete = False

    @classmethod
    def of(cls, signature):
        """A context in which launches follow (or record) the plan of
        `signature`; a no-op without cached launches or with
        KERAS_NHA_TRITON_PLANS=0 (as read by the last `refresh()`)."""
        if not _PLANS[0] or _ACTIVE.plan is not None:  # no nesting
            return _NO_PLAN
        plan = cls._known.get(signature)
        if plan is None:
            if len(cls._known) >= cls._LIMIT:
                cls._known.clear()
            plan = cls._known[signature] = cls(signature)
        return _Using(plan)

    def replay(self, fn):
        """The recorded (kernel, run, rest) of the next launch, or None
        (recording, or a launch unlike the record: the plan is dropped)."""
        use = _ACTIVE
        if not self.complete or not use.replaying:
            return None
        index = use.cursor
        use.cursor = index + 1
        if index < len(self.entries) and self.entries[index][0] is fn:
            return self.entries[index][1]
        use.replaying = False
        Plan._known.pop(self.signature, None)
        return None

    def record(self, fn, found):
        if not self.complete:
            self.entries.append((fn, found))


class _Using:
    """`Plan.of`'s context: the plan active on this thread while inside."""

    def __init__(self, plan):
        self.plan = plan

    def __enter__(self):
        plan = self.plan
        if not plan.complete:
            plan.entries.clear()
        _ACTIVE.plan, _ACTIVE.cursor = plan, 0
        _ACTIVE.replaying = plan.complete

    def __exit__(self, error_type, *_):
        plan = self.plan
        if not plan.complete and error_type is None:
            plan.complete = True
        elif plan.complete and _ACTIVE.replaying and (
                _ACTIVE.cursor != len(plan.entries)):
            Plan._known.pop(plan.signature, None)  # fewer launches: drop
        _ACTIVE.plan = None


class _NoPlan:
    def __enter__(self):
        return None

    def __exit__(self, *_):
        return None


class _Active(threading.local):
    plan = None
    cursor = 0
    replaying = False


_NO_PLAN = _NoPlan()
_ACTIVE = _Active()
_PLANS = [False]
_LAUNCHERS = {}
_FAST = [False]
_TENSOR = [None]  # torch.Tensor, set by `refresh` (no torch import here)
# The driver's current-device and current-stream functions, looked up once
# (`driver.active` is a property chain: microseconds per launch).
_DRIVER = [None]


def refresh():
    """Reads KERAS_NHA_TRITON_FAST_LAUNCH (once per NHA call, not per
    launch: an environment lookup costs microseconds); "0" turns the cached
    launches off."""
    _FAST[0] = (not interpreting() and os.environ.get(
        "KERAS_NHA_TRITON_FAST_LAUNCH", "1") != "0")
    _PLANS[0] = _FAST[0] and os.environ.get("KERAS_NHA_TRITON_PLANS",
                                            "1") != "0"
    if _TENSOR[0] is None:
        import torch
        _TENSOR[0] = torch.Tensor
    if _FAST[0] and _DRIVER[0] is None:
        active = driver.active
        _DRIVER[0] = (active.get_current_device, active.get_current_stream)


def planning():
    """Whether `Plan.of` plans launches (as read by the last `refresh()`)."""
    return _PLANS[0]


def launcher(fn):
    """The launcher to index with a grid for the Triton kernel `fn`.

    Args:
        fn: a `triton.jit` kernel.

    Returns:
        `fn`'s `CachedLauncher`, or `fn` itself under the interpreter or
        with KERAS_NHA_TRITON_FAST_LAUNCH=0 (as read by the last
        `refresh()`).

    Example:

    >>> launcher(window.row_dot_kernel)[(blocks,)](do, out, delta, rows,
    ...                                            D=128, BD=128, BR=16)
    """
    if not _FAST[0]:
        return fn
    if fn not in _LAUNCHERS:
        _LAUNCHERS[fn] = CachedLauncher(fn)
    return _LAUNCHERS[fn]
