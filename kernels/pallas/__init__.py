"""Pallas kernels for NHA (see backends/ for their wiring)."""
