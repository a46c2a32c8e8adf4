"""effattn's backends beside the public implementations of the same algorithm: one command, one
process, identical inputs, one ratio table (time, peak memory, output agreement).

    .venv/bin/python -m benchmarks.peers                         # N=4096, writes reports/peers/
    .venv/bin/python -m benchmarks.peers --n 2048 --repeats 5 --only local,lsh --out /tmp/peers

Comparisons (``--only`` takes these keys; ``full`` and ``sdpa`` select ``dense``), all forward,
bidirectional unless the key says causal, under ``torch.no_grad()``, fp32,
(B, H, N, D) = (1, 8, N, 64):

  dense    effattn `full` and `sdpa`  vs  torch SDPA, compiled flex_attention (no mask)
  local    effattn `local` w=256      vs  compiled flex_attention with a sliding-window BlockMask,
                                          local-attention 1.11.2 (exact_windowsize=True)
  bigbird  effattn `bigbird` b=64 r=3 vs  HF BigBirdBlockSparseAttention (train mode, dropout 0)
  lsh      effattn `lsh` b=64         vs  reformer-pytorch 1.4.4 LSHAttention, HF LSHSelfAttention
  xl       effattn.nn.TransformerXLAttention vs HF 4.57 RelPartialLearnableMultiHeadAttn
           (same weights; qlen N/2 + memory N/2, d_model 512, residual + LayerNorm on both)
  performer, performer_causal
           effattn `performer` m=256  vs  performer-pytorch 1.1.4 FastAttention (our features)
  linear, linear_causal
           effattn `linear`           vs  linear-attention-transformer 0.19.1 linear_attn,
                                          causal_linear_attn
  linformer  effattn `linformer` k=256, alone and as a layer with the peer's projections
           vs linformer 0.2.3 LinformerSelfAttention (our E, F in its proj_k, proj_v)
  nystrom  effattn `nystrom` m=256, alone and as a layer with the peer's projections
           vs nystrom-attention 0.0.14 NystromAttention (6 iterations, residual conv off)

The four kernel / low-rank peers are attention on q, k, v (performer, linear) or layers with
their own q/k/v/out projections (linformer, nystrom): ours is timed alone against both, and as
the same layer (the peer's projection modules around our backend) against the layers, so each
row says what its ratio compares. Causal comparisons run ours causal too.

The peer wrappers live in benchmarks/bench_sparse.py, bench_lsh.py, bench_xl.py and
kernel_lowrank_peers.py (conventions aligned there); this module only arranges them. q, k, v
are drawn as bench_sparse draws them (seed 0), so its wrappers and ours see the same tensors.

Time: every candidate of a comparison once per repeat, interleaved (effattn.bench.interleave,
meters.time_cpu, threads pinned); a candidate's time is the median over repeats
of each repeat's median, its noise the median IQR / median; ``ours / peer`` is the median of the
per-repeat ratios (< 1: ours is faster) and ``speed-up`` the median of peer / ours. The process
keeps freed memory for the next call, as the sweep's workers do (effattn.bench.allocator; on
glibc), so no time includes the OS mapping fresh pages; ``--system-malloc`` times with the C
library's malloc as it comes. Memory: peak
bytes above the inputs of one call (meters.peak_memory_cpu). Agreement: max |ours - peer| and
||ours - peer|| / ||peer|| (Frobenius) where the semantics match, else the reason.
A peer that cannot be imported is a skipped row with the reason; one that raises is a failed row.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import effattn
from benchmarks import machine
from effattn.bench.interleave import Interleaved, time_interleaved
from effattn.bench.meters import MIB, peak_memory_cpu

B, H, D = 1, 8, 64
WINDOW = 256  # the local window (inclusive offset), as benchmarks/bench_sparse.py
PEER_PACKAGES = (
    "torch",
    "transformers",
    "local-attention",
    "reformer-pytorch",
    "performer-pytorch",
    "linear-attention-transformer",
    "linformer",
    "nystrom-attention",
)
ALIASES = {"full": "dense", "sdpa": "dense"}

Call = Callable[[], Tensor]  # one forward on inputs fixed at build time
Builder = Callable[[int], Call]  # sequence length N -> the call


@dataclass(frozen=True)
class Agreement:
    max_abs_diff: float  # max |ours - peer|
    rel_err: float  # ||ours - peer|| / ||peer|| (Frobenius)
    note: str  # on which inputs it was measured


@dataclass(frozen=True)
class Peer:
    name: str  # the public implementation, as users know it
    build: Builder  # raises ImportError when the peer is not installed (-> a skipped row)
    compare_outputs: bool = True  # agreement from the timed calls' outputs (same semantics)
    agreement_check: Callable[[int], Agreement] | None = None  # a separate check, given N
    agreement_note: str = ""  # how agreement is measured, or why there is none
    only_for: tuple[str, ...] | None = None  # our candidates the agreement concerns (None: all)
    time_only_note: str = ""  # the note of the other candidates' rows (time and memory only)


@dataclass(frozen=True)
class Comparison:
    key: str  # dense, local, bigbird, lsh, xl (what --only selects)
    ours: dict[str, Builder]  # our candidates, by name
    peers: tuple[Peer, ...]  # the public implementations of the same algorithm


@dataclass(frozen=True)
class Row:
    algorithm: str  # the comparison's key
    ours: str  # our candidate
    peer: str  # the public implementation
    status: str  # ok, skipped (peer not importable), failed (a call raised)
    reason: str  # why skipped or failed; "" when ok
    threads: int  # torch intra-op threads, pinned
    n: int  # sequence length
    ours_ms: float | None  # median over repeats of the per-repeat median
    peer_ms: float | None
    ours_iqr_over_median: float | None  # median over repeats of IQR / median
    peer_iqr_over_median: float | None
    ours_spread_over_repeats: float | None  # (max - min) / median of the per-repeat medians
    peer_spread_over_repeats: float | None
    time_ratio_ours_over_peer: float | None  # median of per-repeat ratios; < 1: ours faster
    speedup_peer_over_ours: float | None  # median of per-repeat peer / ours
    ours_peak_mib: float | None  # peak memory of one call above its inputs
    peer_peak_mib: float | None
    mem_ratio_ours_over_peer: float | None
    max_abs_diff: float | None  # output agreement; None where the semantics differ
    rel_err: float | None
    agreement_note: str  # how agreement was measured, or why there is none


def inputs(n: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v: (B, H, N, D) fp32, drawn from seed 0 (bench_sparse's recipe, same tensors)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
    return q, k, v


def agreement(ours: Tensor, peer: Tensor, note: str) -> Agreement:
    """Max abs and relative (Frobenius) difference of two outputs of the same shape, in float64."""
    if ours.shape != peer.shape:
        raise ValueError(f"agreement: expected equal shapes, got {ours.shape} and {peer.shape}")
    diff = ours.double() - peer.double()
    return Agreement(
        max_abs_diff=diff.abs().max().item(),
        rel_err=(diff.norm() / peer.double().norm().clamp_min(1e-300)).item(),
        note=note,
    )


# -- the candidates ------------------------------------------------------------------------------
def ours_backend(name: str, *, causal: bool = False, **options: object) -> Builder:
    """Our backend ``name`` on the shared q, k, v: (B, H, N, D) -> (B, H, N, D)."""

    def build(n: int) -> Call:
        backend = effattn.get_backend(name, **options)
        q, k, v = inputs(n)
        return lambda: backend(q, k, v, causal=causal)

    return build


def torch_sdpa(n: int) -> Call:
    q, k, v = inputs(n)
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)


def flex_dense(n: int) -> Call:
    """torch.compile(flex_attention) with no mask (first call compiles, outside the timing)."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention)
    q, k, v = inputs(n)
    return lambda: compiled(q, k, v)


def flex_sliding_window(n: int) -> Call:
    from benchmarks.bench_sparse import flex

    return flex(n, causal=False)


def local_attention_exact(n: int) -> Call:
    from benchmarks.bench_sparse import local_attention_peer

    return local_attention_peer(n, causal=False, grad=False)


def hf_bigbird(n: int) -> Call:
    from benchmarks.bench_sparse import hf_bigbird as build

    return build(n, grad=False)


def lsh_builders(bucket_size: int, n_hashes: int) -> dict[str, Builder]:
    """Ours, reformer-pytorch and HF on the shared-QK inputs (q, v), 1/sqrt(D) for ours."""
    from benchmarks import bench_lsh

    def on_inputs(make: Callable[..., Call]) -> Builder:
        def build(n: int) -> Call:
            q, _, v = inputs(n)
            return make(q, v, bucket_size, n_hashes)

        return build

    return {
        "ours": on_inputs(lambda q, v, b, h: bench_lsh.effattn_lsh_call(q, v, b, h, None)),
        "reformer": on_inputs(bench_lsh.reformer_pytorch_call),
        "hf": on_inputs(bench_lsh.hf_lsh_call),
    }


def lsh_agreement(peer: str, bucket_size: int) -> Callable[[int], Agreement]:
    """Ours vs a peer with one hash round at N = 2 * bucket_size (whatever the timed N), where
    every pair is met once whatever the rotations, ours at the peer's scale (reformer-pytorch
    1/sqrt(D), HF 1)."""

    def check(timed_n: int) -> Agreement:
        from benchmarks import bench_lsh

        n = 2 * bucket_size
        q, _, v = inputs(n)
        scale = 1.0 if peer == "hf" else None
        make = bench_lsh.hf_lsh_call if peer == "hf" else bench_lsh.reformer_pytorch_call
        with torch.no_grad():
            theirs = make(q, v, bucket_size, 1)()
            ours = bench_lsh.effattn_lsh_call(q, v, bucket_size, 1, scale)()
        return agreement(ours, theirs, f"N={n}, 1 hash (every pair met), scale aligned")

    return check


def xl_layer(which: str) -> Builder:
    """Ours or HF's Transformer-XL layer (same weights) on x (1, N/2, 512) + memory N/2."""

    def build(n: int) -> Call:
        from benchmarks import bench_xl

        if which == "hf_transformers":
            bench_xl.hf_modeling()  # ImportError when transformers lacks Transformer-XL
        torch.manual_seed(0)  # the same weights and inputs for both builds
        return bench_xl.layer_calls(n // 2, n - n // 2)[which]

    return build


def performer_agreement(causal: bool) -> Callable[[int], Agreement]:
    """Ours against performer-pytorch's own functions with our features, its eps set to 0."""

    def check(n: int) -> Agreement:
        from benchmarks import kernel_lowrank_peers as klp

        with torch.no_grad():
            theirs = klp.performer_exact_peer(n, causal)
            ours = ours_backend("performer", causal=causal)(n)()
        return agreement(ours, theirs, f"N={n}, same features, their eps offsets 0")

    return check


def linear_agreement(n: int) -> Agreement:
    """Our normalised product with linear_attn's features injected, against linear_attn."""
    from linear_attention_transformer.linear_attention_transformer import linear_attn

    from benchmarks import kernel_lowrank_peers as klp

    q, k, v = inputs(n)
    with torch.no_grad():
        return agreement(
            klp.linear_product_with_peer_features(n),
            linear_attn(q, k, v),
            f"N={n}, our product with their features",
        )


def nystrom_agreement(n: int) -> Agreement:
    """Our layer against NystromAttention with one head (it normalises its pseudo-inverse over
    all heads and the batch; ours per head and sequence)."""
    from benchmarks import kernel_lowrank_peers as klp

    ours, peer, x = klp.nystrom_layers(n, heads=1)
    with torch.no_grad():
        return agreement(ours(x), peer(x), f"N={n}, 1 head, same weights")


def _kernel_lowrank() -> dict[str, Comparison]:
    """performer, performer_causal, linear, linear_causal, linformer, nystrom."""
    from benchmarks import kernel_lowrank_peers as klp

    found: dict[str, Comparison] = {}
    for causal in (False, True):
        tag = "_causal" if causal else ""
        mode = " causal" if causal else ""
        found["performer" + tag] = Comparison(
            "performer" + tag,
            {f"effattn performer m={klp.FEATURES}{mode}": ours_backend("performer", causal=causal)},
            (
                Peer(
                    f"performer-pytorch FastAttention{mode} (our features)",
                    klp.performer_peer(causal),
                    agreement_check=performer_agreement(causal),
                    agreement_note="attention only on both sides; agreement with their own "
                    "feature and product functions, their eps = 1e-4 feature offset set to 0",
                ),
            ),
        )
        found["linear" + tag] = Comparison(
            "linear" + tag,
            {f"effattn linear{mode}": ours_backend("linear", causal=causal)},
            (
                Peer(
                    f"linear-attention-transformer {'causal_' if causal else ''}linear_attn",
                    klp.linear_peer(causal),
                    compare_outputs=False,
                    agreement_check=None if causal else linear_agreement,
                    agreement_note=(
                        "n/a: different feature maps (theirs exp(k), softmax(q)) and their "
                        "queries skip their own 64-position bucket"
                        if causal
                        else "attention only on both sides; agreement: our product with their "
                        "features (softmax over D of q, over N of k), theirs elu+1 differs"
                    ),
                ),
            ),
        )
    alone = "time only: ours is attention alone, the peer's layer includes its q/k/v/out "
    found["linformer"] = Comparison(
        "linformer",
        {
            f"effattn linformer k={klp.RANK}": ours_backend("linformer", rank=klp.RANK),
            f"effattn linformer k={klp.RANK} layer": klp.layer_builder(
                "ours", klp.linformer_layers
            ),
        },
        (
            Peer(
                f"linformer LinformerSelfAttention k={klp.RANK} (layer)",
                klp.layer_builder("peer", klp.linformer_layers),
                agreement_note="layer vs layer: the same weights, our E and F as its "
                "proj_k and proj_v; outputs compared",
                only_for=(f"effattn linformer k={klp.RANK} layer",),
                time_only_note=alone + "projections (512 x 512)",
            ),
        ),
    )
    found["nystrom"] = Comparison(
        "nystrom",
        {
            f"effattn nystrom m={klp.LANDMARKS}": ours_backend("nystrom", landmarks=klp.LANDMARKS),
            f"effattn nystrom m={klp.LANDMARKS} layer": klp.layer_builder(
                "ours", klp.nystrom_layers
            ),
        },
        (
            Peer(
                f"nystrom-attention NystromAttention m={klp.LANDMARKS} (layer, no residual conv)",
                klp.layer_builder("peer", klp.nystrom_layers),
                compare_outputs=False,
                agreement_check=nystrom_agreement,
                agreement_note="layer vs layer, same weights; agreement with 1 head (the "
                "peer normalises its pseudo-inverse over all heads and the batch) and N a "
                "multiple of m (it pads N with zeros that count in its landmark means)",
                only_for=(f"effattn nystrom m={klp.LANDMARKS} layer",),
                time_only_note=alone + "projections (512 x 1536, 512 x 512)",
            ),
        ),
    )
    return found


def comparisons(bucket_size: int = 64, n_hashes: int = 4) -> dict[str, Comparison]:
    """Every comparison, by key; peers' imports happen only when they are built."""
    same = "same inputs, outputs compared"
    lsh = lsh_builders(bucket_size, n_hashes)
    lsh_note = (
        f"timed with {n_hashes} hashes (rounds differ by design: peers chain rounds in one "
        "sorted sequence); agreement: "
    )
    tags = {"lsh": f"effattn lsh b={bucket_size} h={n_hashes}"}
    return {
        "dense": Comparison(
            "dense",
            {"effattn full": ours_backend("full"), "effattn sdpa": ours_backend("sdpa")},
            (
                Peer("torch SDPA", torch_sdpa, agreement_note=same),
                Peer("flex_attention (compiled, dense)", flex_dense, agreement_note=same),
            ),
        ),
        "local": Comparison(
            "local",
            {f"effattn local w={WINDOW}": ours_backend("local", window=WINDOW)},
            (
                Peer(
                    f"flex_attention (compiled, sliding window {WINDOW})",
                    flex_sliding_window,
                    agreement_note=same,
                ),
                Peer(
                    "local-attention (exact_windowsize=True)",
                    local_attention_exact,
                    agreement_note=same,
                ),
            ),
        ),
        "bigbird": Comparison(
            "bigbird",
            {"effattn bigbird b=64 r=3": ours_backend("bigbird")},
            (
                Peer(
                    "HF BigBirdBlockSparseAttention (train, dropout 0)",
                    hf_bigbird,
                    compare_outputs=False,
                    agreement_note="n/a: different random blocks (HF draws its own per call "
                    "in train mode; eval mode draws none)",
                ),
            ),
        ),
        "lsh": Comparison(
            "lsh",
            {tags["lsh"]: lsh["ours"]},
            (
                Peer(
                    "reformer-pytorch LSHAttention",
                    lsh["reformer"],
                    agreement_check=lsh_agreement("reformer", bucket_size),
                    agreement_note=lsh_note + f"N={2 * bucket_size}, 1 hash",
                ),
                Peer(
                    "HF LSHSelfAttention",
                    lsh["hf"],
                    agreement_check=lsh_agreement("hf", bucket_size),
                    agreement_note=lsh_note + f"N={2 * bucket_size}, 1 hash",
                ),
            ),
        ),
        "xl": Comparison(
            "xl",
            {"effattn.nn.TransformerXLAttention": xl_layer("effattn")},
            (
                Peer(
                    "HF RelPartialLearnableMultiHeadAttn",
                    xl_layer("hf_transformers"),
                    agreement_note="same weights and inputs, outputs compared",
                ),
            ),
        ),
        **_kernel_lowrank(),
    }


# -- measuring -----------------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def measure(
    comparison: Comparison, n: int, *, repeats: int, threads: int, min_run_s: float
) -> list[Row]:
    """Time (interleaved repeats), peak memory and agreement of every (ours, peer) pair."""
    calls: dict[str, Call] = {}
    problems: dict[str, tuple[str, str]] = {}  # name -> (status, reason)
    for name, build in [*comparison.ours.items(), *((p.name, p.build) for p in comparison.peers)]:
        try:
            calls[name] = build(n)
        except ImportError as e:
            problems[name] = ("skipped", f"not importable: {e}")
        except Exception as e:  # a peer that cannot run this shape is a row, not a crash
            problems[name] = ("failed", f"{type(e).__name__}: {e}")
    peaks: dict[str, float] = {}
    outputs: dict[str, Tensor] = {}
    with torch.no_grad():
        # A call that raises is a failed row, without times.
        timed = time_interleaved(
            calls, repeats=repeats, threads=threads, min_run_time_s=min_run_s, drop_failing=True
        )
        for name, error in timed.errors.items():
            problems[name] = ("failed", error)
        for name, fn in calls.items():
            if name not in timed.errors:
                peaks[name] = peak_memory_cpu(fn) / MIB
                outputs[name] = fn()
    return [
        _row(comparison.key, ours, peer, n, threads, timed, peaks, outputs, problems)
        for ours in comparison.ours
        for peer in comparison.peers
    ]


def _row(key, ours, peer: Peer, n, threads, timed: Interleaved, peaks, outputs, problems) -> Row:
    bad = [problems[x] for x in (ours, peer.name) if x in problems]
    status, reason = bad[0] if bad else ("ok", "")
    ok = status == "ok"
    found: Agreement | None = None
    note = peer.agreement_note
    if peer.only_for is not None and ours not in peer.only_for:
        note = peer.time_only_note  # another candidate of ours: time and memory only
    elif ok and peer.agreement_check is not None:
        try:
            found = peer.agreement_check(n)
        except Exception as e:
            note = f"agreement check failed: {type(e).__name__}: {e}"
    elif ok and peer.compare_outputs:
        found = agreement(outputs[ours], outputs[peer.name], note)
    return Row(
        algorithm=key,
        ours=ours,
        peer=peer.name,
        status=status,
        reason=reason,
        threads=threads,
        n=n,
        ours_ms=timed.median_ms(ours),
        peer_ms=timed.median_ms(peer.name),
        ours_iqr_over_median=timed.timing_iqr_over_median(ours),
        peer_iqr_over_median=timed.timing_iqr_over_median(peer.name),
        ours_spread_over_repeats=timed.repeat_range_over_median(ours),
        peer_spread_over_repeats=timed.repeat_range_over_median(peer.name),
        time_ratio_ours_over_peer=timed.ratio(ours, peer.name) if ok else None,
        speedup_peer_over_ours=timed.ratio(peer.name, ours) if ok else None,
        ours_peak_mib=peaks.get(ours),
        peer_peak_mib=peaks.get(peer.name),
        mem_ratio_ours_over_peer=_ratio(peaks.get(ours), peaks.get(peer.name)) if ok else None,
        max_abs_diff=found.max_abs_diff if found else None,
        rel_err=found.rel_err if found else None,
        agreement_note=note,
    )


# -- the table and the report --------------------------------------------------------------------
def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _timing(ms: float | None, iqr: float | None, spread: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f} ({iqr:.0%}, {spread:.0%})"


def markdown(rows: list[Row]) -> str:
    """The ratio table: one line per (ours, peer) pair; units in the header."""
    header = (
        "| algorithm | ours | peer | status | ours ms (IQR/med, repeat spread) | peer ms (same) "
        "| time ours/peer | speed-up peer/ours | ours peak MiB | peer peak MiB "
        "| mem ours/peer | max abs diff | rel err | agreement |"
    )
    lines = [header, "|" + "---|" * 14]
    for r in rows:
        status = r.status if r.status == "ok" else f"{r.status}: {r.reason}"
        lines.append(
            "| "
            + " | ".join(
                [
                    r.algorithm,
                    r.ours,
                    r.peer,
                    status.replace("|", "/").replace("\n", " "),
                    _timing(r.ours_ms, r.ours_iqr_over_median, r.ours_spread_over_repeats),
                    _timing(r.peer_ms, r.peer_iqr_over_median, r.peer_spread_over_repeats),
                    _fmt(r.time_ratio_ours_over_peer, ".2f"),
                    _fmt(r.speedup_peer_over_ours, ".2f"),
                    _fmt(r.ours_peak_mib, ".1f"),
                    _fmt(r.peer_peak_mib, ".1f"),
                    _fmt(r.mem_ratio_ours_over_peer, ".2f"),
                    _fmt(r.max_abs_diff, ".1e"),
                    _fmt(r.rel_err, ".1e"),
                    r.agreement_note,
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def environment() -> dict[str, object]:
    """Versions and machine of this run."""
    versions = {}
    for package in PEER_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "versions": versions,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "shape": f"B={B}, H={H}, N=n, D={D}, float32, forward, no_grad",
    }


def write_report(out: Path, rows: list[Row], meta: dict[str, object]) -> None:
    """reports/peers/: results.json (rows + meta) and README.md (the table and how it was made)."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    text = [
        "# effattn beside the peers (CPU)",
        "",
        f"Produced by `{meta['command']}` in one process: {machine.describe(meta)}; "
        f"N={meta['n']}, {meta['repeats']} interleaved repeats, {versions}; "
        f"{meta['machine']}, {meta['cpu_count']} cores; {meta['wall_s']:.0f} s in all.",
        "",
        "Shape (B, H, N, D) = (1, 8, N, 64), fp32, forward, bidirectional (causal where the "
        "key says so), under no_grad (xl: qlen N/2 + memory N/2, d_model 512; linformer and "
        "nystrom layers: x (1, N, 512) with the peer's q/k/v/out projections). "
        "Time: median over repeats of each repeat's median (torch.utils.benchmark); noise in "
        "brackets: the median IQR / median of one "
        "timing, and the spread (max - min) / median of the repeats' medians (load changes). "
        "`time ours/peer` is the median of the per-repeat ratios; < 1 means ours is faster. "
        "Peak MiB: memory of one call above its inputs (profiler memory events, MiB = 2**20). "
        "Agreement: max |ours - peer| and ||ours - peer|| / ||peer|| where the semantics match. "
        "The machine is shared: compare ratios within this table, not "
        "absolute times across runs.",
        "",
        markdown(rows),
        "",
    ]
    (out / "README.md").write_text("\n".join(text))


def selected(only: str, available: dict[str, Comparison]) -> list[Comparison]:
    """The comparisons named in ``only`` (comma-separated keys; empty = all), in table order."""
    if not only:
        return list(available.values())
    keys = {ALIASES.get(k.strip(), k.strip()) for k in only.split(",") if k.strip()}
    unknown = sorted(keys - set(available))
    if unknown:
        known = ", ".join([*available, *ALIASES])
        raise ValueError(f"--only: expected some of {known}, got {', '.join(unknown)}")
    return [c for key, c in available.items() if key in keys]


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="sequence length")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (pinned)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated: dense,local,bigbird,lsh,xl,performer,performer_causal,linear,"
        "linear_causal,linformer,nystrom",
    )
    parser.add_argument("--out", type=Path, default=Path("reports/peers"))
    parser.add_argument("--min-run-s", type=float, default=0.5, help="per timing, seconds")
    parser.add_argument("--bucket-size", type=int, default=64, help="lsh bucket (chunk) size")
    parser.add_argument("--hashes", type=int, default=4, help="lsh hash rounds")
    machine.add_system_malloc_flag(parser)
    args = parser.parse_args(argv)
    chosen = selected(args.only, comparisons(args.bucket_size, args.hashes))
    torch.manual_seed(0)
    setup = machine.prepare_cpu(args.threads, system_malloc=args.system_malloc)
    meta = environment()
    meta.update(
        n=args.n,
        repeats=args.repeats,
        min_run_s=args.min_run_s,
        command=machine.command_line("benchmarks.peers", argv),
    )
    start = time.perf_counter()
    rows: list[Row] = []
    for comparison in chosen:
        found = measure(
            comparison, args.n, repeats=args.repeats, threads=args.threads, min_run_s=args.min_run_s
        )
        print(markdown(found), flush=True)
        rows += found
    meta.update(setup.record(), wall_s=time.perf_counter() - start)
    write_report(args.out, rows, meta)
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
