"""Compile every kernel launch ahead of time for a GPU architecture, on a machine without a GPU.

Triton's interpreter (what the CPU tests run) checks what the kernels compute; it never compiles
them. This module runs Triton's real compiler (TTIR -> PTX -> cubin, with the ptxas bundled in
the triton wheel) for a target such as sm_90, over the launches the library makes: each
autotuner config of the dense kernels and the fixed tiles of the block-sparse kernels, for each
dtype and head-dim tile. Per variant it reports the shared memory against the architecture's
per-block limit, and the registers and stack bytes (spills) per thread, so that a launch that
cannot run, or one that spills, shows up before a GPU is at hand::

    python -m effattn.kernels.compile_check --arch 90 --head-dims 64,128 --dtypes bfloat16

Run it with TRITON_INTERPRET unset: under the interpreter the kernels are not compilable
objects. A variant whose shared memory is over the limit compiles but cannot launch; the
autotuner skips such configs, so a dense kernel needs only one config that fits, while the
block-sparse kernels have a single fixed launch that must fit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import TextIO

import torch

from effattn.kernels._runtime import dot_precision, interpreting

# Shared memory one block may use (the opt-in maximum, bytes), by compute capability.
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Pointer arguments by name: q/k/v-like tensors take the input dtype; the rest are fixed.
_INPUT_POINTERS = {"Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV"}
_FIXED_POINTERS = {
    "LSE": "*fp32", "DELTA": "*fp32", "KPM": "*u8", "TILES": "*u8", "FULL_NUM": "*i32",
    "FULL_IDX": "*i32", "PART_NUM": "*i32", "PART_IDX": "*i32", "PART_TILE": "*i32",
}  # fmt: skip
_FLOAT_SCALARS = {"qk_scale", "sm_scale"}
# Integer arguments compiled as multiples of 16 (N and D of the common, aligned case).
_ALIGNED_INTS = {"q_len", "kv_len", "head_dim"}


@dataclass(frozen=True)
class Variant:
    """One launch of one kernel: the compile-time constants and launch options."""

    kernel: str  # flash_fwd, flash_dq, flash_dkdv, delta, sparse_fwd, sparse_dq, sparse_dkdv
    launch: str  # "autotune" (one of the autotuner's configs) or "fixed" (the only launch)
    dtype: str  # float16, bfloat16, float32
    head_dim_tile: int  # BLOCK_D
    block_m: int
    block_n: int  # 0 for the delta kernel, which has no key tile
    num_warps: int
    num_stages: int
    causal: bool  # the dense kernels' CAUSAL flag; False for the others


@dataclass(frozen=True)
class Compiled:
    """What compiling a :class:`Variant` gave."""

    variant: Variant
    error: str | None  # the compiler's message when it failed, else None
    shared_bytes: int | None  # shared memory per block
    registers: int | None  # per thread
    stack_bytes: int | None  # stack frame per thread: register spills (0 = none)
    fits: bool  # compiled and within the architecture's shared-memory limit


def _kernels() -> dict[str, object]:
    """The JIT functions by variant name (imported here: they need TRITON_INTERPRET unset)."""
    if interpreting():
        raise RuntimeError(
            "TRITON_INTERPRET=1: expected it unset, since the interpreter's kernels cannot be "
            "compiled; run `env -u TRITON_INTERPRET python -m effattn.kernels.compile_check`"
        )
    from effattn.kernels import _tiles, block_sparse, flash

    return {
        "flash_fwd": flash._flash_fwd,
        "flash_dq": flash._flash_bwd_dq,
        "flash_dkdv": flash._flash_bwd_dkdv,
        "delta": _tiles.delta_kernel,
        "sparse_fwd": block_sparse._sparse_fwd,
        "sparse_dq": block_sparse._sparse_bwd_dq,
        "sparse_dkdv": block_sparse._sparse_bwd_dkdv,
    }


def launch_variants(
    dtypes: Iterable[str], head_dim_tiles: Iterable[int], causal: Iterable[bool] = (True, False)
) -> list[Variant]:
    """Every launch the library makes on GPU for these dtypes, head-dim tiles and causal flags:
    the dense kernels' autotuner configs, and the fixed launches of the delta kernel
    (``flash.row_delta``) and of the block-sparse kernels (``dispatch.gpu_tile`` tiles,
    ``flash.fixed_launch`` warps and stages)."""
    from effattn.backends.sparse.dispatch import gpu_tile
    from effattn.kernels import flash

    variants = []
    for dtype in dtypes:
        for d in head_dim_tiles:
            for is_causal in causal:
                for kernel, configs in (
                    ("flash_fwd", flash._FWD_CONFIGS),
                    ("flash_dq", flash._BWD_CONFIGS),
                    ("flash_dkdv", flash._BWD_CONFIGS),
                ):
                    variants += [
                        Variant(kernel, "autotune", dtype, d, m, n, w, s, is_causal)
                        for m, n, w, s in configs
                    ]
            tile = gpu_tile(d, _DTYPE_NAMES[dtype])
            for kernel in ("fwd", "dq", "dkdv"):
                launch = flash.fixed_launch(kernel, tile, tile, d)
                variants.append(
                    Variant(
                        f"sparse_{kernel}", "fixed", dtype, d, tile, tile, launch["num_warps"],
                        launch["num_stages"], False,
                    )
                )  # fmt: skip
            variants.append(Variant("delta", "fixed", dtype, d, flash.DELTA_BLOCK, 0, 4, 3, False))
    return variants


def _signature(fn, dtype: torch.dtype) -> tuple[dict[str, str], dict[tuple[int], list]]:
    """Triton's argument types for ``fn`` and the divisibility hints of the aligned case."""
    signature, attrs = {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            continue
        if name in _INPUT_POINTERS:
            signature[name] = "*" + _TRITON_DTYPE[dtype]
        elif name in _FIXED_POINTERS:
            signature[name] = _FIXED_POINTERS[name]
        else:
            signature[name] = "fp32" if name in _FLOAT_SCALARS else "i32"
        if signature[name].startswith("*") or name in _ALIGNED_INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _constants(fn, variant: Variant, dtype: torch.dtype) -> dict[str, object]:
    values = {
        "CAUSAL": variant.causal,
        "HAS_KPM": True,
        "UPCAST": False,
        "DOT_PRECISION": dot_precision(dtype),
        "BLOCK_M": variant.block_m,
        "BLOCK_N": variant.block_n,
        "BLOCK_D": variant.head_dim_tile,
    }
    return {p.name: values[p.name] for p in fn.params if p.is_constexpr}


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack bytes) per thread of the cubin's one function, from the bundled
    cuobjdump. Spilled registers live in the stack frame (cuobjdump's STACK, not LOCAL)."""
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(
        item.split(":", 1) for line in out.splitlines() if "REG:" in line for item in line.split()
    )
    as_int = lambda key: int(fields[key]) if key in fields else None  # noqa: E731
    return as_int("REG"), as_int("STACK")


def compile_variant(variant: Variant, arch: int = 90) -> Compiled:
    """Compile ``variant`` for sm_``arch`` and read its resource use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernels()[variant.kernel]
    dtype = _DTYPE_NAMES[variant.dtype]
    signature, attrs = _signature(fn, dtype)
    source = ASTSource(fn, signature, _constants(fn, variant, dtype), attrs)
    options = {"num_warps": variant.num_warps, "num_stages": variant.num_stages}
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as error:  # any compiler failure is the result
        message = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
        return Compiled(variant, message, None, None, None, False)
    shared = int(compiled.metadata.shared)
    registers, stack = _resource_usage(compiled.asm["cubin"])
    fits = shared <= MAX_SHARED_BYTES.get(arch, MAX_SHARED_BYTES[90])
    return Compiled(variant, None, shared, registers, stack, fits)


def compile_all(variants: Sequence[Variant], arch: int = 90, jobs: int = 1) -> Iterator[Compiled]:
    """Compile ``variants`` (in ``jobs`` processes when > 1), yielding results in order as
    they finish (a large float32 variant takes a minute or more)."""
    if jobs <= 1:
        yield from (compile_variant(v, arch) for v in variants)
        return
    with ProcessPoolExecutor(jobs) as pool:
        yield from pool.map(compile_variant, variants, [arch] * len(variants))


def launch_problems(results: Sequence[Compiled]) -> list[str]:
    """Launches that would fail on the GPU: a fixed launch that does not fit or compile, or a
    dense kernel with no autotune config that fits for some (dtype, head dim, causal)."""
    problems = []
    groups: dict[tuple, list[Compiled]] = {}
    for r in results:
        v = r.variant
        if v.launch == "fixed" and not r.fits:
            problems.append(f"{_name(v)}: {r.error or _over_limit(r)}")
        elif v.launch == "autotune":
            groups.setdefault((v.kernel, v.dtype, v.head_dim_tile, v.causal), []).append(r)
    for (kernel, dtype, d, causal), group in groups.items():
        if not any(r.fits for r in group):
            problems.append(
                f"{kernel} {dtype} D={d} causal={causal}: no autotune config fits "
                f"({'; '.join(r.error or _over_limit(r) for r in group)})"
            )
    return problems


def _name(v: Variant) -> str:
    return (
        f"{v.kernel} {v.dtype} D={v.head_dim_tile} {v.block_m}x{v.block_n} "
        f"w{v.num_warps} s{v.num_stages}"
    )


def _over_limit(r: Compiled) -> str:
    return f"shared {r.shared_bytes} B over the limit"


def markdown_header(arch: int) -> str:
    limit = MAX_SHARED_BYTES.get(arch, MAX_SHARED_BYTES[90])
    return (
        f"sm_{arch}, shared-memory limit {limit} B per block\n\n"
        "| kernel | launch | dtype | D tile | causal | BLOCK_M x BLOCK_N | warps | stages "
        "| shared_kib | registers | stack_bytes | launches |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )


def markdown_row(r: Compiled) -> str:
    """One table row: the variant, its resources and whether it can launch."""
    v = r.variant
    status = "yes" if r.fits else (f"no: {r.error}" if r.error else "no: shared memory")
    shared = f"{r.shared_bytes / 1024:.1f}" if r.shared_bytes is not None else "-"
    return (
        f"| {v.kernel} | {v.launch} | {v.dtype} | {v.head_dim_tile} | {v.causal} "
        f"| {v.block_m}x{v.block_n} | {v.num_warps} | {v.num_stages} | {shared} "
        f"| {r.registers if r.registers is not None else '-'} "
        f"| {r.stack_bytes if r.stack_bytes is not None else '-'} | {status} |\n"
    )


def markdown(results: Sequence[Compiled], arch: int) -> str:
    """The table of ``results``: one row per variant."""
    return markdown_header(arch) + "".join(markdown_row(r) for r in results)


def _write(files: list[TextIO], text: str) -> None:
    for f in files:
        f.write(text)
        f.flush()


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effattn.kernels.compile_check",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100)")
    parser.add_argument("--dtypes", default="float16,bfloat16,float32")
    parser.add_argument("--head-dims", type=_int_list, default=[16, 32, 64, 128, 256],
                        help="head-dim tiles (powers of two, 16..256)")  # fmt: skip
    parser.add_argument("--launch", choices=["all", "autotune", "fixed"], default="all",
                        help="which launches: all, autotuner configs, fixed")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", help="also write the table (markdown) here")
    parser.add_argument("--json", help="also write the results (JSON lines) here")
    args = parser.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = [d for d in dtypes if d not in _DTYPE_NAMES]
    if unknown:
        parser.error(f"--dtypes: expected some of {', '.join(_DTYPE_NAMES)}, got {unknown}")
    variants = [
        v for v in launch_variants(dtypes, args.head_dims) if args.launch in ("all", v.launch)
    ]
    print(f"compiling {len(variants)} launches for sm_{args.arch}", file=sys.stderr, flush=True)
    results = []
    with contextlib.ExitStack() as files:
        tables = [sys.stdout]  # the table goes to stdout and --out, row by row
        if args.out:
            tables.append(files.enter_context(open(args.out, "w")))
        jsonl = files.enter_context(open(args.json, "w")) if args.json else None
        _write(tables, markdown_header(args.arch))
        for r in compile_all(variants, args.arch, args.jobs):
            results.append(r)
            _write(tables, markdown_row(r))
            if jsonl:
                _write([jsonl], json.dumps(asdict(r)) + "\n")
    problems = launch_problems(results)
    for p in problems:
        print(f"cannot launch: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
