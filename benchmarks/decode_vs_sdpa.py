"""Decoding one token with the K/V cache of `sdpa` and `full` against one torch SDPA call over
the same cache: what the cache's append and bookkeeping cost beside the attention itself.

At each context N (B=1, H=32, Hkv=8, D=128, float32), three cases are timed in interleaved
rounds (effattn.harness.cases): the `sdpa` and `full` decoding states (effattn.decode_state)
holding N - 1 positions, each call attending one new query and rewinding (the same context at
every call), and ``peer:torch-sdpa``, one ``F.scaled_dot_product_attention`` of the 32 query
heads over an (N, 128) cache of each of the 8 key/value heads, in its fastest CPU form (the 4
query heads of a key/value head as 4 rows; CPU's enable_gqa path is slower). The report gives
each state's time over the SDPA call's, per round (median over rounds).

    .venv/bin/python -m benchmarks.decode_vs_sdpa --ns 1024 16384 65536 --rounds 7
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

import effattn
from effattn.harness import cases, machine, table

B, H, HKV, D = 1, 32, 8, 128
FILL = 4096  # positions a state is filled with per call
PEER = "peer:torch-sdpa"


def state_step(name: str, n: int) -> Callable[[], object]:
    """One token decoded by backend ``name`` against a state of n - 1 positions, rewound."""
    gen = torch.Generator().manual_seed(0)
    state = effattn.decode_state(name, batch=B, heads=H, kv_heads=HKV, head_dim=D)
    state.reserve(n)
    with torch.no_grad():
        for start in range(0, n - 1, FILL):
            length = min(FILL, n - 1 - start)
            k, v = (torch.randn(B, HKV, length, D, generator=gen) for _ in range(2))
            state.extend(k, v)
    q = torch.randn(B, H, 1, D, generator=gen)
    k, v = (torch.randn(B, HKV, 1, D, generator=gen) for _ in range(2))
    mark = state.mark()

    def step() -> None:
        with torch.no_grad():
            state.attend(q, k, v)
        state.rewind(mark)

    return step


def sdpa_call(n: int) -> Callable[[], object]:
    """One SDPA call: the H / Hkv query heads of each key/value head as rows over its n keys."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, HKV, H // HKV, D, generator=gen)  # (B, Hkv, G, D): G query rows
    k, v = (torch.randn(B, HKV, n, D, generator=gen) for _ in range(2))
    return torch.no_grad()(lambda: F.scaled_dot_product_attention(q, k, v))


def decode_cases(args: argparse.Namespace) -> list[cases.Case]:
    common = {"heads": H, "head_dim": D, "causal": True, "mode": "decode"}
    found = []
    for n in args.ns:
        found += [
            cases.Case(backend=name, label=name, n=n, build=lambda name=name, n=n: state_step(
                name, n), **common)
            for name in ("sdpa", "full")
        ]  # fmt: skip
        found.append(
            cases.Case(backend=PEER, label="one SDPA call", n=n, build=lambda n=n: sdpa_call(n),
                       **common)
        )  # fmt: skip
    return found


def report(args: argparse.Namespace, setup: machine.CpuSetup, rows: list[dict]) -> None:
    """The table of each state's time over the SDPA call's, into OUT/README.md."""
    by = {(r["n"], r["label"]): r for r in rows}
    lines = []
    for n in args.ns:
        peer = by.get((n, "one SDPA call"))
        for name in ("sdpa", "full"):
            row = by.get((n, name))
            if row is None or peer is None:
                continue
            lines.append({
                "N": n,
                "state": name,
                "ms per token": row.get("time_ms_median"),
                "SDPA call ms": peer.get("time_ms_median"),
                "state / SDPA call": cases.ratio(row, peer),
                "status": row["status"],
            })  # fmt: skip
    text = (
        "# Decoding with a K/V cache against one SDPA call over the same cache\n\n"
        f"Produced by `{machine.command_line('benchmarks.decode_vs_sdpa')}`; B={B}, H={H}, "
        f"Hkv={HKV}, D={D}, float32; {args.rounds} interleaved rounds; "
        f"{machine.describe(setup.record())}.\n\n" + table.markdown(lines) + "\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "README.md").write_text(text)
    print(text)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ns", nargs="+", type=int, default=[1024, 16384, 65536], metavar="N")
    parser.add_argument("--out", type=Path, default=Path("reports") / "decode-vs-sdpa")


def main(argv: Sequence[str] | None = None) -> list[dict]:
    return cases.main(
        decode_cases,
        argv,
        script="benchmarks.decode_vs_sdpa",
        description=__doc__,
        arguments=_arguments,
        report=report,
        run_dir=lambda args: args.out / "run",
        rounds=7,
        min_run_s=2.0,
    )


if __name__ == "__main__":
    main()
