"""Settings of the pytest-benchmark suite, from the environment, so that `make bench` and a
regression check compare like with like."""

from __future__ import annotations

import os

import torch

SEQ_LENS = [int(n) for n in os.environ.get("EFFATTN_BENCH_N", "1024,4096").split(",")]
THREADS = int(os.environ.get("EFFATTN_BENCH_THREADS", "2"))
DEVICE = os.environ.get("EFFATTN_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
SYSTEM_MALLOC = os.environ.get("EFFATTN_BENCH_SYSTEM_MALLOC", "0") == "1"  # else memory kept
