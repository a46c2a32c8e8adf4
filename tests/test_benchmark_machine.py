"""effattn.harness.machine: every benchmark script pins its threads and keeps freed memory as the
sweep's workers do (unless --system-malloc), and says which in what it writes."""

from __future__ import annotations

import json
import types

import pytest
import torch

from benchmarks import bench_lsh, bench_sparse, bench_xl, conftest
from benchmarks.settings import THREADS
from effattn.harness import machine


@pytest.fixture
def kept_calls(monkeypatch):
    """keep_freed_memory recorded instead of called: the test process keeps glibc's defaults."""
    calls: list[int] = []
    monkeypatch.setattr(machine, "keep_freed_memory", lambda: calls.append(1) or True)
    threads = torch.get_num_threads()
    yield calls
    torch.set_num_threads(threads)


def test_prepare_cpu_pins_threads_and_keeps_freed_memory(kept_calls):
    setup = machine.prepare_cpu(1)
    assert torch.get_num_threads() == 1 and kept_calls == [1]
    assert setup.threads == 1 and setup.freed_memory_kept
    record = setup.record()
    assert record["freed_memory_kept"] is True and record["threads"] == 1
    assert {"load_average_start", "load_average_end"} <= set(record)
    text = machine.describe(record)
    assert text.startswith(
        "1 threads pinned; freed memory kept for the next call (effattn.harness.allocator); "
        "load average (1, 5, 15 min) "
    )
    assert text.endswith(" at the end")


def test_command_line_quotes_what_needs_quoting():
    line = machine.command_line("benchmarks.bench_sparse", ["--only", "local causal forward"])
    assert line == "python -m benchmarks.bench_sparse --only 'local causal forward'"


def test_benchmark_suite_records_its_cpu_setup(kept_calls):
    """benchmarks/conftest.py: the pytest-benchmark session keeps freed memory and a saved run
    records it, without the load average (compared runs would always differ in it)."""
    config = types.SimpleNamespace(stash=pytest.Stash())
    conftest.pytest_configure(config)
    info: dict = {}
    conftest.pytest_benchmark_update_machine_info(config, info)
    assert kept_calls == [1]
    assert info["effattn_cpu_setup"] == {"threads": THREADS, "freed_memory_kept": True}


def test_system_malloc_leaves_malloc_as_it_comes(kept_calls):
    setup = machine.prepare_cpu(2, system_malloc=True)
    assert kept_calls == [] and not setup.freed_memory_kept
    assert "the C library's malloc as it comes" in machine.describe(setup.record())


def test_prepare_cpu_refuses_a_thread_count_below_one(kept_calls):
    with pytest.raises(ValueError, match=r"threads: expected a positive thread count, got 0"):
        machine.prepare_cpu(0)
    assert kept_calls == []


@pytest.mark.parametrize("system_malloc", [False, True])
def test_bench_sparse_records_its_cpu_setup(kept_calls, tmp_path, system_malloc):
    argv = ["--n", "512", "--repeats", "1", "--min-run-s", "0.01", "--no-peers"]
    argv += ["--mem-ns", "256,512", "--only", "local causal forward", "--out", str(tmp_path)]
    bench_sparse.main(argv + (["--system-malloc"] if system_malloc else []))
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["freed_memory_kept"] is not system_malloc
    assert kept_calls == ([] if system_malloc else [1])
    assert meta["threads"] == 2 and meta["load_average_end"] is not None
    readme = (tmp_path / "README.md").read_text()
    assert ("freed memory kept for the next call" in readme) is not system_malloc
    assert "2 threads pinned" in readme
    assert meta["command"].endswith(
        "--only 'local causal forward' --out "
        + str(tmp_path)
        + (" --system-malloc" if system_malloc else "")
    )


def test_vs_sdpa_report_records_its_cpu_setup(kept_calls, tmp_path):
    bench_sparse.main(
        ["--vs-sdpa", "--vs-sdpa-ns", "256", "--repeats", "1", "--out", str(tmp_path)]
    )
    text = (tmp_path / "vs_sdpa.md").read_text()
    assert "2 threads pinned; freed memory kept for the next call" in text
    assert kept_calls == [1]


def test_bench_lsh_records_its_cpu_setup(kept_calls, tmp_path):
    pytest.importorskip("reformer_pytorch")
    pytest.importorskip("transformers")
    argv = ["--n", "128", "--long-n", "256", "--hashes", "1", "--repeats", "1"]
    bench_lsh.main([*argv, "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_lsh.json").read_text())
    assert saved["freed_memory_kept"] is True and saved["threads"] == 2 and kept_calls == [1]
    assert saved["command"].startswith("python -m benchmarks.bench_lsh --n 128")
    assert "freed memory kept for the next call" in (tmp_path / "bench_lsh.md").read_text()


def test_bench_xl_records_its_cpu_setup(kept_calls, tmp_path):
    pytest.importorskip("transformers")
    argv = ["--parts", "layer", "--qlen", "32", "--mem", "32", "--repeats", "1"]
    bench_xl.main([*argv, "--min-run-time", "0.01", "--system-malloc", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_xl_layer.json").read_text())
    assert saved["meta"]["freed_memory_kept"] is False and kept_calls == []
    assert "the C library's malloc as it comes" in (tmp_path / "bench_xl_layer.md").read_text()
