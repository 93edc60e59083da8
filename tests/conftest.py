"""Test setup: float64 on JAX (references are compared in float64)."""

import os

os.environ.setdefault("JAX_ENABLE_X64", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
