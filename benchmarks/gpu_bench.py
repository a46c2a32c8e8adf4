"""GPU benchmark of effattn's Triton kernels against torch SDPA (flash) and flex_attention.

One call on an H100/H200 from the source tree (PyTorch 2.11 + Triton 3.6 or newer)::

    PYTHONPATH=. python benchmarks/gpu_bench.py --out reports/gpu/h100.md

Dense: B=4, H=16, D in {64, 128}, N from 1K to 16K, bf16, causal and not, forward and
forward+backward: ``triton`` (ours) vs SDPA's flash backend vs compiled flex_attention.
Sparse: sliding window and BigBird masks (random blocks per head): our block-sparse kernel vs
compiled flex_attention with a BlockMask of the same predicate. Every case is checked against
a reference on the GPU before it is timed; a method that fails or mismatches gets a status,
never a time.
Timing: triton.testing.do_bench (median, L2 flushed between runs). FLOPs: 4*B*H*N*N*D forward
(x0.5 causal), backward 2.5x forward; sparse: the tiles each method computes.

``--dry-run`` runs on CPU under Triton's interpreter: tiny correctness checks, the FLOP counts
and the table, no timing (do_bench needs a GPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIGBIRD_BLOCK = 64  # BigBird's block size (its random/global/window units)
BIGBIRD_RANDOM = 3  # random key blocks per query block


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument(
        "--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"]
    )
    parser.add_argument("--window", type=int, default=256, help="sliding window: |i - j| <= w")
    parser.add_argument("--block", type=int, default=64, help="our block-sparse tile size")
    parser.add_argument("--no-sparse", action="store_true", help="skip the sliding/BigBird cases")
    parser.add_argument("--out", type=Path, default=None, help="table file (default: $OUT/...)")
    parser.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny, no timing")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.batch, args.heads, args.head_dims, args.seq_lens = 1, 2, [32], [64, 96]
        args.window, args.block = 16, 16
    for name in ("batch", "heads", "window", "block"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected a positive int, got {getattr(args, name)}")
    return args


def ensure_kernels_importable() -> None:
    """Map kernels/ to effattn.kernels when running from a source tree without an install
    (setuptools' package-dir mapping only exists in an installed package)."""
    import effattn

    if importlib.util.find_spec("effattn.kernels") is not None:
        return
    spec = importlib.util.spec_from_file_location(
        "effattn.kernels", ROOT / "kernels" / "__init__.py",
        submodule_search_locations=[str(ROOT / "kernels")],
    )  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    sys.modules["effattn.kernels"] = module
    spec.loader.exec_module(module)
    effattn.kernels = module


# -- FLOPs -----------------------------------------------------------------------------------
def dense_flops(batch: int, heads: int, n: int, head_dim: int, *, causal: bool, mode: str) -> int:
    """4*B*H*N*N*D forward, x0.5 causal; forward+backward is 3.5x forward (backward = 2.5x)."""
    forward = 4 * batch * heads * n * n * head_dim // (2 if causal else 1)
    return forward if mode == "fwd" else forward * 7 // 2


def sparse_flops(
    batch: int, head_dim: int, computed_blocks: int, block_m: int, block_n: int, mode: str
) -> int:
    """4*B*D per pair of every computed tile (whole tiles: the work done), x3.5 with backward.
    computed_blocks: the tiles of one batch element, summed over its heads."""
    forward = 4 * batch * head_dim * computed_blocks * block_m * block_n
    return forward if mode == "fwd" else forward * 7 // 2


# -- patterns ----------------------------------------------------------------------------------
def sliding_window(w: int) -> Callable:
    """|i - j| <= w, named ``sliding_window_<w>``: effattn's own predicate."""
    from effattn.patterns import sliding_window as window_predicate

    return window_predicate(w)


def bigbird(n: int, heads: int, device, block: int = BIGBIRD_BLOCK, n_random: int = BIGBIRD_RANDOM):
    """BigBird's block pattern: the first block global (rows and columns), a window of one
    block each side, and ``n_random`` random key blocks per query block, drawn per head (fixed
    seed), as the ``bigbird`` backend draws them. ``pred(q_idx, kv_idx)`` gives (H, Nq, Nk);
    ``pred(q_idx, kv_idx, head)`` one head's pattern (flex_attention's mask_mod)."""
    import torch

    blocks = -(-n // block)
    gen = torch.Generator().manual_seed(0)
    draws = torch.rand(heads, blocks, blocks, generator=gen)
    table = torch.zeros(heads, blocks, blocks, dtype=torch.bool)
    table.scatter_(2, draws.topk(min(n_random, blocks), dim=2).indices, True)  # (H, Nb, Nb)
    table = table.to(device)

    def pred(q_idx, kv_idx, head=slice(None)):
        qb, kb = q_idx // block, kv_idx // block
        return (qb == 0) | (kb == 0) | ((qb - kb).abs() <= 1) | table[head, qb, kb]

    pred.__name__ = f"bigbird_{block}_{n_random}"
    pred.heads = heads
    return pred


# -- rows and the table ----------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    case: str  # dense / causal / sliding_window_256 / bigbird_64_3
    mode: str  # fwd or fwd+bwd
    n: int  # sequence length N
    head_dim: int  # D
    method: str  # triton, sdpa_flash, flex
    status: str  # ok, mismatch, failed, dry-run
    time_ms_median: float | None  # do_bench median; None unless status == ok
    tflops: float | None  # FLOPs / time; None unless ok
    flops: int  # the FLOP count used (see dense_flops / sparse_flops)
    reason: str = ""  # why a method has no time


def render_table(rows: list[Row], header: str) -> str:
    """A markdown table, one line per (case, mode, N, D, method), with units in the columns."""
    lines = [
        header,
        "",
        "| case | mode | N | D | method | status | time_ms_median | TFLOP/s | GFLOP | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        time = f"{r.time_ms_median:.3f}" if r.time_ms_median is not None else "-"
        tflops = f"{r.tflops:.1f}" if r.tflops is not None else "-"
        lines.append(
            f"| {r.case} | {r.mode} | {r.n} | {r.head_dim} | {r.method} | {r.status} | {time} "
            f"| {tflops} | {r.flops / 1e9:.4g} | {r.reason} |"
        )
    return "\n".join(lines) + "\n"


def environment_header(dry_run: bool) -> str:
    import torch
    import triton

    device = "CPU (Triton interpreter, dry run)" if dry_run else torch.cuda.get_device_name()
    cuda = torch.version.cuda or "-"
    return (
        f"# effattn GPU benchmark\n\ndevice: {device}; torch {torch.__version__}; "
        f"triton {triton.__version__}; CUDA {cuda}; dtype bfloat16; timing: "
        "triton.testing.do_bench median, L2 flushed; FLOPs: 4*B*H*N*N*D fwd (x0.5 causal), "
        "x3.5 fwd+bwd; sparse: computed tiles."
    )


def default_out(dry_run: bool) -> Path:
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "reports" / "gpu"
    return folder / ("gpu_bench_dry_run.md" if dry_run else "gpu_bench.md")


# -- running ---------------------------------------------------------------------------------
def _max_error(got, want) -> float:
    return float((got.float() - want.float()).abs().max())


def run_case(
    methods: dict[str, tuple[Callable, int]], reference: str, q, k, v, *, mode: str,
    dry_run: bool, meta: dict, tolerance: float = 2e-2,
) -> list[Row]:  # fmt: skip
    """Check every method against ``reference`` (output, and gradients with backward), then
    time those that passed. methods: name -> (fn(q, k, v) -> out, flops)."""
    import torch

    backward = mode == "fwd+bwd"
    inputs = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    grad_out = torch.randn_like(q)
    results: dict[str, list] = {}
    for name, (fn, _) in methods.items():
        try:
            out = fn(*inputs)
            grads = []
            if backward:
                grads = list(torch.autograd.grad(out, inputs, grad_out))
            results[name] = [out.detach(), *grads]
        except Exception as error:  # a method that raised is reported, never timed
            results[name] = error
    want = results.get(reference)
    rows = []
    for name, (fn, flops) in methods.items():
        got = results[name]
        row = {"method": name, "flops": flops, "time_ms_median": None, "tflops": None, **meta}
        if isinstance(got, Exception):
            rows.append(Row(status="failed", reason=f"{type(got).__name__}: {got}"[:120], **row))
            continue
        if isinstance(want, Exception) or want is None:
            rows.append(Row(status="unchecked", reason=f"reference {reference} failed", **row))
            continue
        errors = [_max_error(a, b) for a, b in zip(got, want, strict=True)]
        scale = max(1.0, *(float(w.float().abs().max()) for w in want))
        if max(errors) > tolerance * scale:
            rows.append(Row(status="mismatch", reason=f"max error {max(errors):.2e}", **row))
            continue
        if dry_run:
            rows.append(Row(status="dry-run", reason=f"max error {max(errors):.1e}", **row))
            continue
        rows.append(_timed(fn, inputs, grad_out, backward, row))
    return rows


def _timed(fn, inputs, grad_out, backward: bool, row: dict) -> Row:
    import torch
    from triton.testing import do_bench

    if backward:

        def step():
            torch.autograd.grad(fn(*inputs), inputs, grad_out)
    else:

        def step():
            fn(*inputs)

    ms = do_bench(step, warmup=25, rep=100, return_mode="median")
    return Row(status="ok", time_ms_median=ms, tflops=row["flops"] / ms / 1e9, **row)


def dense_methods(args, n: int, head_dim: int, causal: bool, mode: str, device) -> dict:
    import torch.nn.functional as F

    from effattn.kernels.flash import flash_attention

    flops = dense_flops(args.batch, args.heads, n, head_dim, causal=causal, mode=mode)
    methods = {"triton": (lambda q, k, v: flash_attention(q, k, v, causal=causal), flops)}
    if args.dry_run:
        sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
        methods["sdpa"] = (sdpa, flops)
        return methods
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def sdpa_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    methods["sdpa_flash"] = (sdpa_flash, flops)
    block_mask = None
    if causal:
        block_mask = create_block_mask(
            lambda b, h, qi, ki: ki <= qi, None, None, n, n, device=device
        )
    flex = _compiled_flex(flex_attention)
    methods["flex"] = (lambda q, k, v: flex(q, k, v, block_mask=block_mask), flops)
    return methods


_FLEX = {}


def _compiled_flex(flex_attention):
    import torch

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def sparse_methods(args, pred, n: int, head_dim: int, mode: str, device) -> dict:
    """Our block-sparse kernel and compiled flex_attention over the same predicate, one
    pattern for every head, or one per head when ``pred`` has a ``heads`` attribute."""
    from effattn.kernels.block_mask import BlockMask
    from effattn.kernels.block_sparse import block_sparse_attention
    from effattn.patterns import Pattern, dense_mask
    from effattn.reference import pattern_attention

    ours = BlockMask.from_predicate(pred, n, n, args.block, args.block, device)
    blocks = ours.num_computed_blocks * (args.heads // ours.heads)
    flops = sparse_flops(args.batch, head_dim, blocks, args.block, args.block, mode)
    methods = {
        "triton_block_sparse": (lambda q, k, v: block_sparse_attention(q, k, v, ours), flops)
    }
    if args.dry_run:
        mask = dense_mask(pred, n, n, device)  # (N, N) or (H, N, N)
        pattern = Pattern(mask=mask.expand(1, args.heads, n, n))
        dense = lambda q, k, v: pattern_attention(q, k, v, pattern, q.shape[-1] ** -0.5)  # noqa: E731
        methods["torch_dense_reference"] = (dense, flops)
        return methods
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    per_head = getattr(pred, "heads", None)
    if per_head:
        mask_mod = lambda b, h, qi, ki: pred(qi, ki, h)  # noqa: E731
    else:
        mask_mod = lambda b, h, qi, ki: pred(qi, ki)  # noqa: E731
    flex_mask = create_block_mask(mask_mod, None, per_head, n, n, device=device)
    size = flex_mask.BLOCK_SIZE
    flex_blocks = int(flex_mask.kv_num_blocks.sum())  # (1, H or 1, Mb) -> blocks
    if flex_mask.full_kv_num_blocks is not None:
        flex_blocks += int(flex_mask.full_kv_num_blocks.sum())
    flex_blocks *= 1 if per_head else args.heads
    flex_flops = sparse_flops(args.batch, head_dim, flex_blocks, size[0], size[1], mode)
    flex = _compiled_flex(flex_attention)
    methods["flex"] = (lambda q, k, v: flex(q, k, v, block_mask=flex_mask), flex_flops)
    return methods


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    ensure_kernels_importable()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_bench: expected a CUDA device (or --dry-run), got none", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    torch.manual_seed(0)
    rows: list[Row] = []
    for head_dim in args.head_dims:
        for n in args.seq_lens:
            shape = (args.batch, args.heads, n, head_dim)
            q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
            cases = [("dense", False, None), ("causal", True, None)]
            bigbird_block = args.block if args.dry_run else BIGBIRD_BLOCK
            if not args.no_sparse:
                window = sliding_window(args.window)
                bigbird_pattern = bigbird(n, args.heads, device, bigbird_block)
                cases += [(None, False, window), (None, False, bigbird_pattern)]
            for name, causal, pred in cases:
                for mode in args.modes:
                    meta = {
                        "case": name or pred.__name__,
                        "mode": mode,
                        "n": n,
                        "head_dim": head_dim,
                    }
                    if pred is None:
                        methods = dense_methods(args, n, head_dim, causal, mode, device)
                        reference = "sdpa" if args.dry_run else "sdpa_flash"
                    else:
                        methods = sparse_methods(args, pred, n, head_dim, mode, device)
                        reference = "torch_dense_reference" if args.dry_run else "flex"
                    case_rows = run_case(methods, reference, q, k, v, mode=mode,
                                         dry_run=args.dry_run, meta=meta)  # fmt: skip
                    for r in case_rows:
                        print(f"{r.case} {r.mode} N={r.n} D={r.head_dim} {r.method}: {r.status} "
                              f"{r.time_ms_median} ms {r.reason}", flush=True)  # fmt: skip
                    rows += case_rows
    table = render_table(rows, environment_header(args.dry_run))
    out = args.out or default_out(args.dry_run)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(table)
    print(f"written to {out}")
    return 0 if all(r.status in ("ok", "dry-run") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
