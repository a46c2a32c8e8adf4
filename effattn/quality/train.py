"""One training run (a QualityPoint): build the task and the model, train for the step budget,
evaluate; and the worker process that runs it (:func:`worker_main`).

Training: AdamW, linear warm-up then cosine decay to 0, gradient clipping, cross-entropy over
the scored positions, a fresh batch from the train stream every step (effattn.quality.tasks:
train data depends on the seed; validation and test sets are fixed, the same for every
backend and seed). The model is initialised from ``torch.manual_seed(seed)``. Validation
accuracy is taken ``evals`` times (for the curve only); test accuracy once, at the end of the
budget: nothing is chosen by validation or test accuracy.

Speed and memory of the same run: the time of each training step (forward, backward, optimizer
step; data generation not included), reported as steps per second (1 / median step time), and
the peak memory of one more training step after the test (effattn.harness.meters).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from effattn.harness import meters
from effattn.harness.allocator import keep_freed_memory
from effattn.harness.meters import MIB
from effattn.harness.worker import MemoryCap, failure, redirect_output
from effattn.quality.model import QualityModel
from effattn.quality.spec import QualityPoint
from effattn.quality.tasks import IGNORE, Batch, Task, make_task, stream_rng
from effattn.registry import get_backend

CURVE_POINTS = 10  # loss curve: mean training loss of each tenth of the steps


def build(point: QualityPoint) -> tuple[Task, QualityModel]:
    """The point's task and its model, initialised from the point's seed."""
    task = make_task(point.task, point.n, dict(point.task_options))
    torch.manual_seed(point.seed)
    model = QualityModel(
        task.num_tokens,
        task.num_classes,
        point.n,
        point.model,
        point.backend,
        dict(point.options),
        causal=point.causal,
    )
    return task, model


def learning_rate(step: int, steps: int, peak: float, warmup: float) -> float:
    """Linear warm-up over ``warmup * steps`` steps, then cosine decay to 0 at ``steps``."""
    ramp = max(1, round(warmup * steps))
    if step < ramp:
        return peak * (step + 1) / ramp
    progress = (step - ramp) / max(1, steps - ramp)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def loss_of(model: QualityModel, batch: Batch) -> torch.Tensor:
    scored = batch.targets != IGNORE
    return F.cross_entropy(model(batch.inputs, scored), batch.targets[scored])


@torch.no_grad()
def accuracy(model: QualityModel, batches: list[Batch]) -> float:
    """Share of the scored positions of ``batches`` whose argmax is the target."""
    model.eval()
    right = total = 0
    for batch in batches:
        scored = batch.targets != IGNORE
        guess = model(batch.inputs, scored).argmax(dim=-1)
        right += int((guess == batch.targets[scored]).sum())
        total += int(scored.sum())
    model.train()
    return right / max(total, 1)


def eval_set(task: Task, stream: str, size: int, batch: int) -> list[Batch]:
    """``size`` sequences of a fixed stream ("val" or "test"), in batches of ``batch``."""
    rng = stream_rng(stream)
    return [task.batch(min(batch, size - i), rng) for i in range(0, size, batch)]


def majority_accuracy(batches: list[Batch]) -> float:
    """Accuracy of always answering the most frequent target of ``batches``."""
    targets = torch.cat([b.targets[b.targets != IGNORE] for b in batches])
    return float(torch.bincount(targets).max()) / max(len(targets), 1)


def pair_fraction(point: QualityPoint) -> dict[str, float | None]:
    """What share of full attention the backend computes at the point's shape (per layer):
    ``flops_fraction`` = backend.flops() / full's flops (the same direction); ``pair_fraction``
    = the pairs its pattern() attends over / the pairs full attends over, None for backends
    without a pattern (low-rank and kernel methods)."""
    cfg, n = point.model, point.n
    backend = get_backend(point.backend, **dict(point.options))
    full = get_backend("full")
    shape = (1, cfg.heads, n, n, cfg.head_dim)
    flops = backend.flops(*shape, causal=point.causal) / full.flops(*shape, causal=point.causal)
    pairs = None
    if backend.has_pattern:
        q = torch.randn(1, cfg.heads, n, cfg.head_dim, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            mask = backend.pattern(q, q.clone(), q.clone(), causal=point.causal).mask
        dense = n * n if not point.causal else n * (n + 1) // 2
        pairs = float(mask.expand(1, cfg.heads, n, n).sum()) / (cfg.heads * dense)
    return {"flops_fraction": flops, "pair_fraction": pairs}


def reach(point: QualityPoint, batches: list[Batch]) -> dict[str, float | None]:
    """For tasks whose answers sit at one position (``Batch.sources``) and backends with a
    fixed pattern: the share of scored positions whose answer position the pattern reaches in
    one layer (``reach_1``) and through ``layers`` layers (``reach_all``, the paths of the
    pattern composed: a position can pass on what it saw); every head's pattern counts. None
    where this does not apply (listops; LSH, whose pattern depends on the learned content;
    low-rank and kernel backends, which mix every position)."""
    backend = get_backend(point.backend, **dict(point.options))
    if not backend.has_pattern or point.backend == "lsh" or batches[0].sources is None:
        return {"reach_1": None, "reach_all": None}
    cfg, n = point.model, point.n
    q = torch.randn(1, cfg.heads, n, cfg.head_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mask = backend.pattern(q, q.clone(), q.clone(), causal=point.causal).mask
    one = mask.expand(1, cfg.heads, n, n).any(dim=1)[0].float()  # (Nq, Nk): any head
    paths = one.clone()
    for _ in range(cfg.layers - 1):
        paths = ((paths @ one) > 0).float()  # (Nq, Nk): reachable in one more layer
    hits = {"reach_1": 0, "reach_all": 0}
    total = 0
    for batch in batches:
        rows, cols = (batch.sources >= 0).nonzero(as_tuple=True)
        src = batch.sources[rows, cols]
        hits["reach_1"] += int(one[cols, src].sum())
        hits["reach_all"] += int(paths[cols, src].sum())
        total += len(cols)
    return {k: v / max(total, 1) for k, v in hits.items()}


def train(point: QualityPoint, *, stop: Any = None) -> dict[str, Any]:
    """Train the point's model for its step budget; returns the row fields (accuracies,
    losses, speed, memory, pair fraction, reach). ``stop``: a callable checked every step;
    when it returns True the run ends with RuntimeError (an orphaned worker stops itself)."""
    cfg = point.train
    torch.set_num_threads(cfg.threads)
    task, model = build(point)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True
    )
    val = eval_set(task, "val", cfg.val_size, cfg.batch)
    rng = stream_rng("train", point.seed)
    step_s: list[float] = []
    losses: list[float] = []
    val_curve: list[list[float]] = []
    every = max(1, cfg.steps // cfg.evals)
    started = time.perf_counter()
    for step in range(cfg.steps):
        if stop is not None and stop():
            raise RuntimeError("the driver is gone (orphaned worker)")
        batch = task.batch(cfg.batch, rng)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg.steps, cfg.lr, cfg.warmup)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step_s.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"training loss is {losses[-1]} at step {step}")
        if (step + 1) % every == 0 or step + 1 == cfg.steps:
            val_curve.append([step + 1, round(accuracy(model, val), 5)])
    train_s = time.perf_counter() - started
    test = eval_set(task, "test", cfg.test_size, cfg.batch)
    test_acc = accuracy(model, test)

    extra = task.batch(cfg.batch, rng)

    def one_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of(model, extra).backward()
        optimizer.step()

    peak = meters.peak_memory_cpu(one_step)
    tenth = max(1, len(losses) // CURVE_POINTS)
    curve = [statistics.fmean(losses[i : i + tenth]) for i in range(0, len(losses), tenth)]
    median = statistics.median(step_s)
    return {
        "test_acc": test_acc,
        "val_acc": val_curve[-1][1],
        "val_curve": val_curve,
        "chance_acc": task.chance(),
        "majority_acc": majority_accuracy(test),
        "shortcut_acc": task.shortcut_accuracy(test),
        "loss_first": curve[0],
        "loss_last": curve[-1],
        "loss_curve": [round(x, 5) for x in curve],
        "steps": cfg.steps,
        "step_ms_median": median * 1e3,
        "step_ms_iqr": _iqr(step_s) * 1e3,
        "steps_per_s": 1.0 / median,
        "tokens_per_s": cfg.batch * point.n / median,
        "train_s": train_s,
        "peak_mem_mib": peak / MIB,
        "params": params,
        **pair_fraction(point),
        **reach(point, test),
    }


def _iqr(values: list[float]) -> float:
    if len(values) < 4:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q3 - q1


def worker_main(
    conn: Connection, point: QualityPoint, mem_limit_mib: int, log: Path | None = None
) -> None:
    """Process target (effattn.harness.worker.RunningWorker.start_target): train ``point`` under
    a memory cap and send one dict ``{"status", "reason", **fields}``. stdout and stderr go to
    ``log``. The worker keeps freed memory for the next step, as the sweep's workers do
    (effattn.harness.allocator), so that steps/s counts no page faults. A worker whose parent
    (the forkserver, which ends with the driver) is gone stops at its next step instead of
    training for nobody."""
    redirect_output(log, point.describe())
    parent = os.getppid()
    keep_freed_memory()
    torch.set_num_threads(point.train.threads)
    torch.ones(64, 64) @ torch.ones(64, 64)  # start the thread pool before the cap
    try:
        with MemoryCap("cpu", mem_limit_mib):
            fields = train(point, stop=lambda: os.getppid() != parent)
        result = {"status": "ok", "reason": "", **fields}
    except BaseException as err:  # report, never raise: the parent records a cell
        status, reason = failure(err)
        result = {"status": status, "reason": reason}
    try:
        conn.send(result)
    finally:
        conn.close()
