"""PyTorch wiring. Fast paths (Triton) register here."""

import torch


def fast_paths():
    return {}


def fast_step_paths():
    return {}


def is_concrete(x):
    if torch.compiler.is_compiling():
        return False
    return isinstance(x, torch.Tensor) and x.device.type != "meta"
