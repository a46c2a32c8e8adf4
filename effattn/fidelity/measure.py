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

A setting under a config is a :class:`FidelityPoint` (its ``key`` identifies it in a run), and its
result a :class:`FidelityRow`, a row of the run store (effattn.harness.store.make_row);
:func:`measure` hands each row to ``on_row`` as soon as it is made (effattn.fidelity.runner
appends it to the run's results.jsonl).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
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
from effattn.harness.store import make_row, point_key
from effattn.ops import attention_flops, pair_count
from effattn.registry import BackendSpec, get_backend

DTYPE = torch.float32  # the model's weights and every backend call
STATUSES = ("ok", "unsupported", "crashed")  # a FidelityRow's status


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
class FidelityPoint:
    """One setting under one config: what a row of a run measured, and so its identity."""

    curve: str  # the plot curve (backend and fixed options)
    backend: str  # the backend name
    options: tuple[tuple[str, Any], ...]  # (option, value) pairs as in the setting's spec
    causal: bool  # run causally, against a causal exact reference
    documents: int  # documents measured
    seq_len: int  # N
    batch_size: int  # documents per forward pass (pairs_fraction is of the first batch)
    device: str  # cpu or cuda

    @classmethod
    def of(cls, setting: Setting, config: FidelityConfig) -> FidelityPoint:
        """A registered setting under ``config``."""
        spec = setting.spec
        return cls(setting.curve, spec.name, spec.options, setting.causal, *_measured(config))

    @classmethod
    def of_skipped(cls, skipped: Skipped, config: FidelityConfig) -> FidelityPoint:
        """A setting whose backend is not registered here: its options as written (strings)."""
        name, _, rest = skipped.label.partition(":")
        items = [item.partition("=") for item in filter(None, rest.split(","))]
        options = tuple((key, value) for key, _, value in items)
        return cls(skipped.curve, name, options, False, *_measured(config))

    @property
    def label(self) -> str:
        """The backend spec, ``local:window=64``."""
        return BackendSpec(self.backend, self.options).label

    @property
    def key(self) -> str:
        """A stable identity for resuming: every field, as canonical JSON."""
        return point_key(self)

    @property
    def setting(self) -> Setting:
        return Setting(self.curve, BackendSpec(self.backend, self.options))


def _measured(config: FidelityConfig) -> tuple[int, int, int, str]:
    """The fields of ``config`` that change a measurement (a point's, after its setting)."""
    return config.documents, config.seq_len, config.batch_size, config.device


@dataclass(frozen=True)
class FidelityRow:
    """One setting's fidelity, or why it was not measured (status not "ok": metrics None); a
    row of the run store, made by :meth:`make`."""

    key: str  # FidelityPoint.key: identity for resuming
    curve: str  # the plot curve (backend and fixed options)
    label: str  # the backend spec, ``local:window=64``
    backend: str  # the backend name
    options: dict[str, Any]  # its options
    causal: bool  # run causally, against a causal exact reference
    documents: int  # documents measured
    seq_len: int  # N
    batch_size: int  # documents per forward pass
    device: str  # cpu or cuda
    status: str  # ok, unsupported (not registered, or refuses the call) or crashed
    reason: str  # why not ok; "" when ok
    flops_fraction: float | None = None  # forward FLOPs / dense attention's at N
    pairs_fraction: float | None = None  # pattern() pairs / all pairs; None without a pattern
    cosine_mean: float | None = None  # embedding cosine vs exact, mean over documents
    cosine_min: float | None = None  # ... and minimum
    layer_errors: tuple[float, ...] = ()  # per layer: mean over documents of the relative error
    recall_at_1: float | None = None  # both halves embedded with the backend
    recall_at_1_exact: float | None = None  # both with exact attention (same causality)
    recall_at_1_mixed: float | None = None  # backend first halves vs exact second halves
    time_s: float | None = None  # wall time of the setting's model runs (loaded machine: rough)
    finished_at: str = ""  # UTC ISO time the row was written
    host: str = ""  # hostname of the machine that wrote the row
    job_id: str = ""  # Slurm or submitit job, if any

    @classmethod
    def make(
        cls, point: FidelityPoint, status: str, reason: str = "", **measured: Any
    ) -> FidelityRow:
        return make_row(cls, STATUSES, point, status, reason, measured)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> FidelityRow:
        """A row as read back from results.jsonl (a dict; lists where the row has tuples)."""
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in record.items() if k in known}
        return cls(**{**fields, "layer_errors": tuple(fields.get("layer_errors", ()))})


@dataclass(frozen=True)
class FidelityRun:
    """A run's rows and what they were measured on (what its report shows)."""

    rows: tuple[FidelityRow, ...]
    corpus_modules: tuple[str, ...]  # one document per module
    corpus_digest: str  # sha256 of the token ids
    python: str  # the Python whose standard library gave the text
    config: FidelityConfig
    versions: dict[str, str] = field(default_factory=dict)  # torch, transformers, the model
    wall_s: float = 0.0  # seconds spent measuring (corpus and model loads included)


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
    """A point's per-layer errors and pattern fractions, gathered batch by batch."""

    def __init__(self, point: FidelityPoint, backend: Backend) -> None:
        self.point = point
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
    points: Sequence[FidelityPoint],
    config: FidelityConfig = FidelityConfig(),
    progress: Callable[[str], None] | None = None,
    on_row: Callable[[FidelityRow], None] | None = None,
    on_corpus: Callable[[Corpus], None] | None = None,
) -> FidelityRun:
    """Measure every point (registered backends, measured fields those of ``config``) on the
    corpus against exact attention (see the module docstring).

    Rows: one per point, in order; each is also handed to ``on_row`` as soon as it is made (the
    unsupported ones first, then one per measured setting). ``on_corpus`` sees the corpus once
    it is loaded, before any row (raising there stops the run). An empty ``points`` loads the
    corpus only. Raises extra.MissingExtraError (naming the install command) without the
    fidelity extra.
    """
    extra.require_extra()
    for point in points:
        got = (point.documents, point.seq_len, point.batch_size, point.device)
        if got != _measured(config):
            raise ValueError(
                f"point {point.label}: expected the config's documents, seq_len, batch_size and "
                f"device {_measured(config)}, got {got}"
            )
    say = progress or (lambda _line: None)
    started = time.perf_counter()
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        folder = extra.model_dir(config.model_root)
        corpus = load_corpus(load_tokenizer(folder), config.documents, config.seq_len)
        say(f"corpus: {len(corpus)} documents, 2 x {corpus.seq_len} tokens ({corpus.digest[:12]})")
        if on_corpus is not None:
            on_corpus(corpus)
        measurer = _Measurer(config, corpus, folder, say, on_row or (lambda _row: None))
        rows = measurer.measure_all(points)
    finally:
        torch.set_num_threads(threads_before)
    return FidelityRun(
        rows=tuple(rows),
        corpus_modules=corpus.modules,
        corpus_digest=corpus.digest,
        python=corpus.python,
        config=config,
        versions=versions(),
        wall_s=time.perf_counter() - started,
    )


class _Measurer:
    """One session's corpus and model folder, and where its rows go."""

    def __init__(
        self,
        config: FidelityConfig,
        corpus: Corpus,
        folder: Path,
        say: Callable[[str], None],
        emit: Callable[[FidelityRow], None],
    ) -> None:
        self.config = config
        self.corpus = corpus
        self.folder = folder
        self.say = say
        self.emit = emit

    def measure_all(self, points: Sequence[FidelityPoint]) -> list[FidelityRow]:
        """The rows of ``points`` in order: the exact passes feed every tally, then each
        setting's model runs."""
        rows: dict[int, FidelityRow] = {}
        tallies: dict[int, _Tally] = {}
        for index, point in enumerate(points):
            backend = get_backend(point.backend, **dict(point.options))
            reasons = backend.not_supported_reasons(
                device=self.config.device, dtype=DTYPE, causal=point.causal, head_dim=None
            )
            if reasons:
                rows[index] = self._row(point, "unsupported", "; ".join(reasons))
            else:
                tallies[index] = _Tally(point, backend)
        exact = self._exact_runs(list(tallies.values()))
        for index, tally in tallies.items():
            rows[index] = self._row_of(tally, exact[tally.point.causal])
        return [rows[i] for i in range(len(points))]

    def _row(self, point: FidelityPoint, status: str, reason: str, **metrics: Any) -> FidelityRow:
        row = FidelityRow.make(point, status, reason, **metrics)
        self.emit(row)
        self.say(_progress_line(row))
        return row

    def _exact_runs(self, tallies: list[_Tally]) -> dict[bool, ExactRun]:
        """The exact model's run in each mode (causal or not) that a tally needs."""
        if not tallies:
            return {}
        reference = load_model(self.folder, REFERENCE, self.config.device)
        exact: dict[bool, ExactRun] = {}
        for causal in sorted({t.point.causal for t in tallies}):
            mode = [t for t in tallies if t.point.causal == causal]
            t0 = time.perf_counter()
            exact[causal] = _exact_pass(reference, self.corpus, self.config, causal, mode)
            self.say(
                f"exact ({'causal' if causal else 'bidirectional'}): recall@1 "
                f"{exact[causal].recall:.3f}, {time.perf_counter() - t0:.1f} s"
            )
        return exact

    def _row_of(self, tally: _Tally, exact: ExactRun) -> FidelityRow:
        """Run the setting's own model on both halves; its row against ``exact``."""
        point, backend, config = tally.point, tally.backend, self.config
        if tally.failure:
            return self._row(point, "crashed", tally.failure)
        started = time.perf_counter()
        try:
            model = load_model(self.folder, register_setting(point.setting.spec), config.device)
            with causal_attention(model, point.causal):
                first = embed(model, self.corpus.first, config.batch_size)
                second = embed(model, self.corpus.second, config.batch_size)
        except Exception as err:  # recorded as the row's status, never turned into a number
            return self._row(point, "crashed", f"{type(err).__name__}: {err}")
        elapsed = time.perf_counter() - started
        cosine = F.cosine_similarity(first, exact.first, dim=-1)  # (count,)
        n, heads, dim = config.seq_len, exact.heads, exact.head_dim
        dense = attention_flops(1, heads, dim, pair_count(n, n, causal=point.causal))
        flops = backend.flops(1, heads, n, n, dim, causal=point.causal)
        return self._row(
            point,
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


def _progress_line(row: FidelityRow) -> str:
    if row.status != "ok":
        return f"{row.label}: {row.status}: {row.reason}"
    return (
        f"{row.label}: cosine {row.cosine_mean:.5f} (min {row.cosine_min:.5f}), layer error "
        f"max {max(row.layer_errors):.3g}, recall@1 {row.recall_at_1:.3f} "
        f"(exact {row.recall_at_1_exact:.3f}), FLOPs {row.flops_fraction:.2f} of dense, "
        f"{row.time_s:.1f} s"
    )


def versions() -> dict[str, str]:
    """torch's, transformers' and the model package's versions."""
    import importlib.metadata

    found = {"torch": torch.__version__}
    for dist in ("transformers", extra.MODEL_PACKAGE):
        found[dist] = importlib.metadata.version(dist)
    return found
