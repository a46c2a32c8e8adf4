import pytest
import torch

from benchmarks.settings import SYSTEM_MALLOC, THREADS
from effattn.harness import machine

_SETUP = pytest.StashKey[machine.CpuSetup]()


def pytest_configure(config: pytest.Config) -> None:
    """The suite's process keeps freed memory for the next call, as the sweep's workers do
    (effattn.harness.machine; EFFATTN_BENCH_SYSTEM_MALLOC=1 leaves the C library's malloc as it
    comes)."""
    config.stash[_SETUP] = machine.prepare_cpu(THREADS, system_malloc=SYSTEM_MALLOC)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """A saved run records the thread count and the malloc policy (not the load average:
    `--benchmark-compare` warns when machine_info differs between the runs it compares)."""
    setup = config.stash[_SETUP]
    machine_info["effattn_cpu_setup"] = {
        "threads": setup.threads,
        "freed_memory_kept": setup.freed_memory_kept,
    }


@pytest.fixture(autouse=True)
def _pinned_threads():
    """The thread count is pinned (and recorded in extra_info) for every benchmark."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    yield
