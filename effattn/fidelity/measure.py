"""Fidelity of each backend inside the pretrained encoder, against the model's own exact attention.

For every setting (a backend with options) and the corpus' documents (two halves of N tokens
each, effattn.fidelity.corpus):

1. sentence-embedding cosine against exact attention (mean pooling), mean and minimum over the
   documents' first halves;
2. per-layer attention-output relative error on the model's real q, k, v: each layer's q, k, v
   and attention output are recorded by hooks in the exact run; the backend recomputes that
   layer's attention from the same q, k, v; ``||out - exact|| / ||exact||`` per document (over
   heads, positions, features), averaged over the documents, per layer;
3. retrieval recall@1: each first half must find its own second half among all second halves
   by embedding cosine; both halves embedded with the backend (``recall_at_1``), with exact
   attention (``recall_at_1_exact``), and the backend's first halves against an index of second
   halves embedded with exact attention (``recall_at_1_mixed``: swapping the attention of a
   deployed retriever without re-embedding its index);
4. cost: ``flops_fraction``, the backend's forward FLOPs (``Backend.flops``) over dense
   attention's at N: for sparse backends the fraction of (query, key) pairs it computes (blocks
   counted whole); and ``pairs_fraction``, the distinct pairs of its ``pattern()`` on the real
   q, k over all pairs (mean over layers and the first batch of documents), for backends that
   attend over a subset of pairs.

Causal-only backends (``xl``) run causally, and so does their exact reference: the same model
with every self-attention layer made causal (the model was not trained so; it measures how
close the backend comes to causal attention on this model's activations).

The exact reference is transformers' own ``sdpa`` attention; each backend runs in a model loaded
with ``attn_implementation="effattn_..."`` through effattn.integrations.huggingface.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from effattn.backend import Backend
from effattn.fidelity import extra
from effattn.fidelity.corpus import Corpus, load_corpus
from effattn.fidelity.grid import Setting, Skipped
from effattn.fidelity.model import (
    REFERENCE,
    AttentionCapture,
    LayerActivations,
    causal_attention,
    embed,
    load_model,
    load_tokenizer,
    register_setting,
)
from effattn.ops import attention_flops, pair_count
from effattn.registry import get_backend

DTYPE = torch.float32  # the model's weights and every backend call


@dataclass(frozen=True)
class FidelityConfig:
    """What a fidelity run measures on, and how."""

    documents: int = 24  # documents (each two halves of seq_len tokens); >= 2
    seq_len: int = 512  # N: tokens per half, [CLS] and [SEP] included (the model has 512)
    batch_size: int = 4  # documents per forward pass
    threads: int | None = 2  # CPU intra-op threads, pinned during the run; None: torch's
    device: str = "cpu"  # cpu or cuda
    model_root: Path | None = None  # where the model is unpacked; None: ~/.cache/effattn

    def __post_init__(self) -> None:
        for name, low in (("documents", 2), ("seq_len", 4), ("batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads: expected None or an int >= 1, got {self.threads!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {self.device!r}")


@dataclass(frozen=True)
class FidelityRow:
    """One setting's fidelity, or why it was not measured (status not "ok": metrics None)."""

    curve: str  # the plot curve (backend and fixed options)
    label: str  # the backend spec, ``local:window=64``
    backend: str  # the backend name
    causal: bool  # run causally, against a causal exact reference
    status: str  # ok, unsupported (not registered, or refuses the call) or crashed
    reason: str  # why not ok; "" when ok
    documents: int  # documents measured
    seq_len: int  # N
    flops_fraction: float | None = None  # forward FLOPs / dense attention's at N
    pairs_fraction: float | None = None  # pattern() pairs / all pairs; None without a pattern
    cosine_mean: float | None = None  # embedding cosine vs exact, mean over documents
    cosine_min: float | None = None  # ... and minimum
    layer_errors: tuple[float, ...] = ()  # per layer: mean over documents of the relative error
    recall_at_1: float | None = None  # both halves embedded with the backend
    recall_at_1_exact: float | None = None  # both with exact attention (same causality)
    recall_at_1_mixed: float | None = None  # backend first halves vs exact second halves
    time_s: float | None = None  # wall time of the setting's model runs (loaded machine: rough)


@dataclass(frozen=True)
class FidelityRun:
    """A run's rows and what they were measured on."""

    rows: tuple[FidelityRow, ...]
    corpus_modules: tuple[str, ...]  # one document per module
    corpus_digest: str  # sha256 of the token ids
    python: str  # the Python whose standard library gave the text
    config: FidelityConfig
    versions: dict[str, str] = field(default_factory=dict)  # torch, transformers, the model
    wall_s: float = 0.0  # the whole run


@dataclass(frozen=True)
class ExactRun:
    """The exact model's embeddings and recall@1 in one mode (causal or not), and its shape."""

    first: Tensor  # (count, E): embeddings of the first halves
    second: Tensor  # (count, E): of the second halves
    recall: float  # recall@1 of first halves against second halves
    heads: int  # H of the model's attention layers
    head_dim: int  # D


def recall_at_1(queries: Tensor, keys: Tensor) -> float:
    """The fraction of queries (count, E) whose most cosine-similar key (count, E) is their own
    (same row)."""
    sims = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T  # (count, count)
    hits = sims.argmax(dim=-1) == torch.arange(len(queries))
    return hits.float().mean().item()


def relative_errors(out: Tensor, exact: Tensor) -> Tensor:
    """``||out - exact|| / ||exact||`` per batch element of (B, H, N, D) tensors -> (B,)."""
    diff = (out.double() - exact.double()).flatten(1).norm(dim=1)
    return diff / exact.double().flatten(1).norm(dim=1)


def pattern_fraction(backend: Backend, layer: LayerActivations) -> float | None:
    """Distinct (query, key) pairs of the backend's pattern on a layer's real q, k, over all
    pairs that causality allows; None for backends without a pattern (low-rank, kernel)."""
    if not backend.has_pattern:
        return None
    mask = backend.pattern(layer.q, layer.k, layer.v, causal=layer.causal).mask
    batch, heads, n, _ = layer.q.shape
    kept = mask.expand(batch, heads, n, n).sum().item()  # (B or 1, H or 1, N, N) -> all
    return kept / (batch * heads * pair_count(n, n, causal=layer.causal))


class _Tally:
    """A setting's per-layer errors and pattern fractions, gathered batch by batch."""

    def __init__(self, setting: Setting, backend: Backend) -> None:
        self.setting = setting
        self.backend = backend
        self.errors: list[list[Tensor]] = []  # [layer][batch] -> (b,)
        self.pairs: list[float] = []
        self.failure: str = ""

    def add(self, layers: list[LayerActivations], first_batch: bool) -> None:
        if self.failure:
            return
        try:
            with torch.inference_mode():
                for index, layer in enumerate(layers):
                    out = self.backend(
                        layer.q, layer.k, layer.v, causal=layer.causal, scale=layer.scale
                    )
                    if index == len(self.errors):
                        self.errors.append([])
                    self.errors[index].append(relative_errors(out, layer.out))
                    if first_batch and (fraction := pattern_fraction(self.backend, layer)):
                        self.pairs.append(fraction)
        except Exception as err:  # recorded as the row's status, never turned into a number
            self.failure = f"{type(err).__name__}: {err}"

    def layer_errors(self) -> tuple[float, ...]:
        return tuple(torch.cat(per_layer).mean().item() for per_layer in self.errors)


def measure(
    settings: list[Setting],
    config: FidelityConfig = FidelityConfig(),
    skipped: tuple[Skipped, ...] | list[Skipped] = (),
    progress: Callable[[str], None] | None = None,
) -> FidelityRun:
    """Measure every setting on the corpus against exact attention (see the module docstring).

    Rows: one per setting, in order, then one per ``skipped`` entry (status "unsupported",
    with its reason). Raises extra.MissingExtraError (naming the install command) without the
    fidelity extra.
    """
    extra.require_extra()
    say = progress or (lambda _line: None)
    started = time.perf_counter()
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        folder = extra.model_dir(config.model_root)
        corpus = load_corpus(load_tokenizer(folder), config.documents, config.seq_len)
        say(f"corpus: {len(corpus)} documents, 2 x {corpus.seq_len} tokens ({corpus.digest[:12]})")
        rows = _measure_all(settings, config, corpus, folder, say)
    finally:
        torch.set_num_threads(threads_before)
    rows += [
        FidelityRow(
            s.curve, s.label, s.label.partition(":")[0], False, "unsupported", s.reason,
            config.documents, config.seq_len,
        )
        for s in skipped
    ]  # fmt: skip
    return FidelityRun(
        rows=tuple(rows),
        corpus_modules=corpus.modules,
        corpus_digest=corpus.digest,
        python=corpus.python,
        config=config,
        versions=_versions(),
        wall_s=time.perf_counter() - started,
    )


def _measure_all(
    settings: list[Setting],
    config: FidelityConfig,
    corpus: Corpus,
    folder: Path,
    say: Callable[[str], None],
) -> list[FidelityRow]:
    rows: dict[int, FidelityRow] = {}
    tallies: dict[int, _Tally] = {}
    for index, setting in enumerate(settings):
        backend = get_backend(setting.spec.name, **dict(setting.spec.options))
        reasons = backend.not_supported_reasons(
            device=config.device, dtype=DTYPE, causal=setting.causal, head_dim=None
        )
        if reasons:
            rows[index] = _row(setting, config, "unsupported", "; ".join(reasons))
        else:
            tallies[index] = _Tally(setting, backend)

    reference = load_model(folder, REFERENCE, config.device)
    exact: dict[bool, ExactRun] = {}
    for causal in sorted({tallies[i].setting.causal for i in tallies}):
        mode = [t for t in tallies.values() if t.setting.causal == causal]
        t0 = time.perf_counter()
        exact[causal] = _exact_pass(reference, corpus, config, causal, mode)
        say(
            f"exact ({'causal' if causal else 'bidirectional'}): recall@1 "
            f"{exact[causal].recall:.3f}, {time.perf_counter() - t0:.1f} s"
        )
    del reference

    for index, tally in tallies.items():
        rows[index] = _measure_setting(tally, config, corpus, folder, exact[tally.setting.causal])
        say(_progress_line(rows[index]))
    return [rows[i] for i in range(len(settings))]


def _exact_pass(
    model: torch.nn.Module,
    corpus: Corpus,
    config: FidelityConfig,
    causal: bool,
    tallies: list[_Tally],
) -> ExactRun:
    """The exact model's embeddings of both halves and its recall@1; meanwhile each setting
    recomputes every layer's attention from the recorded q, k, v."""
    capture = AttentionCapture(model)
    first = []
    with causal_attention(model, causal):
        for number, chunk in enumerate(corpus.first.split(config.batch_size)):
            with capture:
                first.append(embed(model, chunk, config.batch_size))
            for tally in tallies:
                tally.add(capture.layers, first_batch=number == 0)
        second = embed(model, corpus.second, config.batch_size)
    first = torch.cat(first)
    q = capture.layers[0].q  # (B, H, N, D)
    return ExactRun(first, second, recall_at_1(first, second), q.shape[1], q.shape[3])


def _measure_setting(
    tally: _Tally,
    config: FidelityConfig,
    corpus: Corpus,
    folder: Path,
    exact: ExactRun,
) -> FidelityRow:
    setting, backend = tally.setting, tally.backend
    if tally.failure:
        return _row(setting, config, "crashed", tally.failure)
    started = time.perf_counter()
    try:
        model = load_model(folder, register_setting(setting.spec), config.device)
        with causal_attention(model, setting.causal):
            first = embed(model, corpus.first, config.batch_size)
            second = embed(model, corpus.second, config.batch_size)
    except Exception as err:  # recorded as the row's status, never turned into a number
        return _row(setting, config, "crashed", f"{type(err).__name__}: {err}")
    elapsed = time.perf_counter() - started
    cosine = F.cosine_similarity(first, exact.first, dim=-1)  # (count,)
    n, heads, dim = config.seq_len, exact.heads, exact.head_dim
    dense = attention_flops(1, heads, dim, pair_count(n, n, causal=setting.causal))
    flops = backend.flops(1, heads, n, n, dim, causal=setting.causal)
    return _row(
        setting,
        config,
        "ok",
        "",
        flops_fraction=flops / dense,
        pairs_fraction=sum(tally.pairs) / len(tally.pairs) if tally.pairs else None,
        cosine_mean=cosine.mean().item(),
        cosine_min=cosine.min().item(),
        layer_errors=tally.layer_errors(),
        recall_at_1=recall_at_1(first, second),
        recall_at_1_exact=exact.recall,
        recall_at_1_mixed=recall_at_1(first, exact.second),
        time_s=elapsed,
    )


def _row(
    setting: Setting, config: FidelityConfig, status: str, reason: str, **metrics: Any
) -> FidelityRow:
    return FidelityRow(
        curve=setting.curve,
        label=setting.label,
        backend=setting.spec.name,
        causal=setting.causal,
        status=status,
        reason=reason,
        documents=config.documents,
        seq_len=config.seq_len,
        **metrics,
    )


def _progress_line(row: FidelityRow) -> str:
    if row.status != "ok":
        return f"{row.label}: {row.status}: {row.reason}"
    return (
        f"{row.label}: cosine {row.cosine_mean:.5f} (min {row.cosine_min:.5f}), layer error "
        f"max {max(row.layer_errors):.3g}, recall@1 {row.recall_at_1:.3f} "
        f"(exact {row.recall_at_1_exact:.3f}), FLOPs {row.flops_fraction:.2f} of dense, "
        f"{row.time_s:.1f} s"
    )


def _versions() -> dict[str, str]:
    import importlib.metadata

    versions = {"torch": torch.__version__}
    for dist in ("transformers", extra.MODEL_PACKAGE):
        versions[dist] = importlib.metadata.version(dist)
    return versions
