"""Triton kernels, installed and imported as ``effattn.kernels`` (never as top-level ``kernels``).

Triton is imported lazily by the modules here, so ``import effattn`` works without it.
"""
