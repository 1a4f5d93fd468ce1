"""Triton kernels, one module per family (imported lazily by vitkernels/ops so that a machine
without Triton still loads the package)."""
