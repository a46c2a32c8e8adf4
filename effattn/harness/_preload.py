"""Imported once by the workers' forkserver, before it forks workers: loads torch and effattn and,
on a machine without CUDA, starts the CPU profiler once (its first use costs ~2.5 s; a forked
worker then starts warm). With CUDA present nothing more is done: the server must not touch
anything that could initialise CUDA before forking."""

import os

# Ask NVML, not the CUDA runtime, whether there is a GPU: the runtime would enumerate devices in
# the server, and a forked worker's CUDA_VISIBLE_DEVICES (one GPU per worker) could be ignored.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import torch

import effattn.backends  # noqa: F401
from effattn.harness.meters import peak_memory_cpu

if not torch.cuda.is_available():
    peak_memory_cpu(lambda: torch.ones(8))
