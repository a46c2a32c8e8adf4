"""The tasks: seeded generators of (inputs, targets) batches, no downloads.

Every task makes batches of the same form (:class:`Batch`): token ids of shape (B, N, C), whose
C channels are embedded by one table and summed (a position may carry a key and a value at
once), and per-position class targets (B, N), ``IGNORE`` where a position is not scored. The
same batch serves causal and bidirectional models: every scored position comes after (or is)
the last token it needs, so a causal model can answer it too.

- ``mqar``: multi-query associative recall (Arora et al. 2023, "Zoology"), in the
  one-position-per-pair form: ``num_kv_pairs`` positions of the first half each hold a key and
  its value (two channels, summed), the queries (the key alone) sit at positions of the second
  half, all drawn uniformly, so key-query distances span the whole sequence. The answer is the
  queried key's value. Zoology's form, key and value at adjacent positions, needs an induction
  circuit that forms only after thousands of steps; this one is solved by content matching in
  hundreds, which fits a CPU budget, and still needs a query to reach its pair wherever it is.
- ``listops``: Nangia & Bowman's ListOps as in the Long Range Arena: nested ``[MAX``, ``[MIN``,
  ``[MED``, ``[SM`` over digits with closing brackets (kept in the input), evaluated here;
  the expression starts at position 0 (padding after it), its 10-way label is scored at its
  closing bracket, the last token, which a causal model can answer too.
- ``nearest_recall``: a task where locality is what matters. The sequence is cut into blocks of
  ``block_len``; each block opens with ``num_kv_pairs`` key-value pairs and queries some of them
  later in the block. Even blocks define one set of keys and odd blocks another, every key of
  the set in every block, each time with a fresh value: the answer is the value of the query's
  *nearest* definition (always in its own block, at most ``block_len - 1`` back; every other
  definition of the key is more than ``block_len`` away on either side). Content alone finds
  N / (2 * block_len) candidates; a pattern that looks only nearby finds one.

Generators take a ``numpy.random.Generator``; :func:`stream_rng` derives the train, validation
and test streams of a seed so that the three never share a draw.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

IGNORE = -100  # target of an unscored position (torch.nn.functional.cross_entropy's default)
STREAMS = {"train": 0, "val": 1, "test": 2}  # the three data streams; val and test ignore seed


def stream_rng(stream: str, seed: int = 0) -> np.random.Generator:
    """The random generator of one data stream. ``train`` depends on ``seed`` (each training
    seed sees its own data); ``val`` and ``test`` do not: every backend and seed is validated
    and tested on the same sequences, which no training stream draws."""
    if stream not in STREAMS:
        raise ValueError(f"stream: expected one of {', '.join(STREAMS)}, got {stream!r}")
    entropy = [STREAMS[stream], seed if stream == "train" else 0]
    return np.random.default_rng(np.random.SeedSequence(entropy))


@dataclass(frozen=True)
class Batch:
    """One batch of a task.

    inputs:  (B, N, C) int64 token ids < ``task.num_tokens``; the C channels are summed after
             embedding.
    targets: (B, N) int64 class < ``task.num_classes`` at the scored positions, IGNORE elsewhere.
    sources: (B, N) int64 position of the token that holds the answer of each scored position
             (its key-value pair), -1 elsewhere; None for tasks whose answer needs the whole
             input (listops). Used to tell how many answers a pattern can reach.
    """

    inputs: Tensor
    targets: Tensor
    sources: Tensor | None = None


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class Task:
    """Base of the tasks: a frozen dataclass whose fields are its options (seq_len first)."""

    seq_len: int  # N, tokens per sequence

    name: ClassVar[str] = ""
    channels: ClassVar[int] = 1  # C: token ids summed at each position
    description: ClassVar[str] = ""

    @property
    def num_tokens(self) -> int:
        """Size of the embedding table: every token id is below it."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def batch(self, size: int, rng: np.random.Generator) -> Batch:
        """``size`` sequences drawn from ``rng``."""
        raise NotImplementedError

    def chance(self) -> float:
        """Accuracy of a uniform guess."""
        return 1.0 / self.num_classes

    def shortcut_accuracy(self, batches: Sequence[Batch]) -> float | None:
        """Accuracy of the task's best answer from a shortcut (see each task), on ``batches``;
        None where the task has none."""
        return None

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


TASKS: dict[str, type[Task]] = {}


def _register(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls


# -- mqar --------------------------------------------------------------------------------------
@_register
@dataclass(frozen=True)
class MQAR(Task):
    """Multi-query associative recall, one position per key-value pair (module docstring).

    The P pairs sit at distinct positions drawn uniformly from the first half of the sequence
    (not packed at 0..P-1, where they would coincide with the global tokens of a pattern such
    as BigBird's first block), the queries at distinct positions drawn uniformly from the second
    half. Token ids: 0 = blank (an empty channel), 1..K keys, K+1..K+V values,
    K = V = vocab_size / 2. Channel 0 holds keys, channel 1 values. Targets: the value's index
    0..V-1.
    """

    num_kv_pairs: int = 16  # P: pairs in the first half, every key distinct
    vocab_size: int = 128  # keys + values (half each), as Zoology's vocab_size
    num_queries: int | None = None  # queries per sequence (distinct keys); None = num_kv_pairs

    name: ClassVar[str] = "mqar"
    channels: ClassVar[int] = 2
    description: ClassVar[str] = (
        "multi-query associative recall: P key-value pairs (one position each) spread over the "
        "first half, queries of their keys spread over the second half"
    )

    def __post_init__(self) -> None:
        _check_int("seq_len", self.seq_len, 4)
        _check_int("num_kv_pairs", self.num_kv_pairs, 1)
        _check_int("vocab_size", self.vocab_size, 4)
        if self.vocab_size % 2:
            raise ValueError(f"vocab_size: expected an even number, got {self.vocab_size}")
        if self.num_kv_pairs > self.vocab_size // 2:
            raise ValueError(
                f"num_kv_pairs: expected at most vocab_size / 2 = {self.vocab_size // 2} "
                f"(distinct keys), got {self.num_kv_pairs}"
            )
        if self.num_queries is not None:
            _check_int("num_queries", self.num_queries, 1)
        if self.num_kv_pairs > self.seq_len // 2:
            raise ValueError(
                f"num_kv_pairs: expected at most seq_len / 2 = {self.seq_len // 2} (the pairs "
                f"fill the first half at most), got {self.num_kv_pairs}"
            )
        queries = self.queries
        if queries > self.num_kv_pairs:
            raise ValueError(
                f"num_queries: expected at most num_kv_pairs = {self.num_kv_pairs}, got {queries}"
            )

    @property
    def queries(self) -> int:
        return self.num_kv_pairs if self.num_queries is None else self.num_queries

    @property
    def num_tokens(self) -> int:
        return self.vocab_size + 1  # the blank

    @property
    def num_classes(self) -> int:
        return self.vocab_size // 2

    def batch(self, size: int, rng: np.random.Generator) -> Batch:
        n, p, q, half = self.seq_len, self.num_kv_pairs, self.queries, self.vocab_size // 2
        keys = rng.random((size, half)).argsort(axis=1)[:, :p]  # (B, P) distinct keys 0..K-1
        values = rng.integers(0, half, (size, p))  # (B, P)
        asked = rng.random((size, p)).argsort(axis=1)[:, :q]  # (B, Q) which pairs are queried
        first = n // 2
        # distinct positions: pairs in 0..N/2-1, queries in N/2..N-1 (distances span N)
        at = rng.random((size, first)).argsort(axis=1)[:, :p]  # (B, P)
        where = first + rng.random((size, n - first)).argsort(axis=1)[:, :q]  # (B, Q)
        inputs = np.zeros((size, n, 2), dtype=np.int64)
        targets = np.full((size, n), IGNORE, dtype=np.int64)
        sources = np.full((size, n), -1, dtype=np.int64)
        rows = np.arange(size)[:, None]
        inputs[rows, at, 0] = 1 + keys
        inputs[rows, at, 1] = 1 + half + values
        inputs[rows, where, 0] = 1 + np.take_along_axis(keys, asked, axis=1)
        targets[rows, where] = np.take_along_axis(values, asked, axis=1)
        sources[rows, where] = np.take_along_axis(at, asked, axis=1)
        return Batch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(sources))


# -- nearest_recall ----------------------------------------------------------------------------
@_register
@dataclass(frozen=True)
class NearestRecall(Task):
    """Recall of a key's nearest definition, keys redefined two blocks away (module docstring).

    Keys: 2P of them; even blocks define keys 0..P-1, odd blocks keys P..2P-1, each block all P
    of its keys in a random order, each with a fresh value. Block b holds its pairs at
    b*G .. b*G+P-1 and its queries at distinct positions of b*G+P .. b*G+G-1. Token ids:
    0 = blank, 1..2P keys, 2P+1..2P+V values. Targets: the value's index 0..V-1.
    """

    block_len: int = 32  # G: positions per block; seq_len must be a multiple of it
    num_kv_pairs: int = 8  # P: pairs opening each block (every key of the block's parity)
    num_values: int = 32  # V: the values (the classes)
    num_queries: int | None = None  # queries per block; None = num_kv_pairs

    name: ClassVar[str] = "nearest_recall"
    channels: ClassVar[int] = 2
    description: ClassVar[str] = (
        "recall of the nearest definition: blocks of G positions open with P pairs; every key "
        "is defined again (another value) two blocks away"
    )

    def __post_init__(self) -> None:
        _check_int("seq_len", self.seq_len, 4)
        _check_int("block_len", self.block_len, 2)
        _check_int("num_kv_pairs", self.num_kv_pairs, 1)
        _check_int("num_values", self.num_values, 2)
        if self.seq_len % self.block_len:
            raise ValueError(
                f"block_len: expected a divisor of seq_len = {self.seq_len}, got {self.block_len}"
            )
        if self.num_queries is not None:
            _check_int("num_queries", self.num_queries, 1)
        if self.queries > self.num_kv_pairs or self.num_kv_pairs + self.queries > self.block_len:
            raise ValueError(
                f"num_queries: expected at most num_kv_pairs = {self.num_kv_pairs} and "
                f"block_len - num_kv_pairs = {self.block_len - self.num_kv_pairs}, "
                f"got {self.queries}"
            )

    @property
    def queries(self) -> int:
        return self.num_kv_pairs if self.num_queries is None else self.num_queries

    @property
    def num_tokens(self) -> int:
        return 1 + 2 * self.num_kv_pairs + self.num_values  # blank, keys, values

    @property
    def num_classes(self) -> int:
        return self.num_values

    def batch(self, size: int, rng: np.random.Generator) -> Batch:
        g, p, q, v = self.block_len, self.num_kv_pairs, self.queries, self.num_values
        blocks = self.seq_len // g
        # (B, blocks, P): every key of the block's parity, in a random order
        keys = rng.random((size, blocks, p)).argsort(axis=2)
        keys = keys + p * (np.arange(blocks) % 2)[None, :, None]
        values = rng.integers(0, v, (size, blocks, p))  # (B, blocks, P)
        asked = rng.random((size, blocks, p)).argsort(axis=2)[:, :, :q]  # (B, blocks, Q)
        where = p + rng.random((size, blocks, g - p)).argsort(axis=2)[:, :, :q]  # in-block
        inputs = np.zeros((size, blocks, g, 2), dtype=np.int64)  # (B, N, 2) as blocks
        targets = np.full((size, blocks, g), IGNORE, dtype=np.int64)
        sources = np.full((size, blocks, g), -1, dtype=np.int64)
        b_idx = np.arange(size)[:, None, None]
        k_idx = np.arange(blocks)[None, :, None]
        inputs[:, :, :p, 0] = 1 + keys
        inputs[:, :, :p, 1] = 1 + 2 * p + values
        inputs[b_idx, k_idx, where, 0] = 1 + np.take_along_axis(keys, asked, axis=2)
        targets[b_idx, k_idx, where] = np.take_along_axis(values, asked, axis=2)
        sources[b_idx, k_idx, where] = asked + g * k_idx
        n = self.seq_len
        return Batch(
            torch.from_numpy(inputs.reshape(size, n, 2)),  # (B, blocks, G, 2) -> (B, N, 2)
            torch.from_numpy(targets.reshape(size, n)),  # (B, blocks, G) -> (B, N)
            torch.from_numpy(sources.reshape(size, n)),
        )


# -- listops -----------------------------------------------------------------------------------
OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
LISTOPS_VOCAB = ("<pad>", *map(str, range(10)), *OPERATORS, "]")  # token id = index
_TOKEN_ID = {tok: i for i, tok in enumerate(LISTOPS_VOCAB)}


def apply_operator(op: str, args: Sequence[int]) -> int:
    """The value of ``op`` over digits: MAX, MIN, MED (the lower median: the
    ``(len - 1) // 2``-th smallest), SM (sum mod 10)."""
    if op == "[MAX":
        return max(args)
    if op == "[MIN":
        return min(args)
    if op == "[MED":
        return sorted(args)[(len(args) - 1) // 2]
    if op == "[SM":
        return sum(args) % 10
    raise ValueError(f"op: expected one of {', '.join(OPERATORS)}, got {op!r}")


@_register
@dataclass(frozen=True)
class ListOps(Task):
    """ListOps (LRA): a random expression tree, written with its brackets, and its value.

    Each sequence draws a target length uniformly from min_len..seq_len, starts from a root
    operator over digits and grows: a random digit above ``max_depth`` becomes an operator over
    2..max_args digits, until the next growth would pass the target (a tree that ends shorter
    than min_len is drawn again). Operators are uniform over
    OPERATORS, digits uniform over 0-9. (LRA draws trees and rejects those of the wrong length;
    growing to a drawn length gives the same kind of tree at a cost linear in N.) Token ids:
    LISTOPS_VOCAB, 0 = padding.
    """

    max_depth: int = 10  # operator nesting at most, the root counting 1 (LRA: 10)
    max_args: int = 10  # children of an operator, at most, 2 at least (LRA: 10)
    min_len: int | None = None  # shortest expression in tokens; None = seq_len // 4

    name: ClassVar[str] = "listops"
    description: ClassVar[str] = (
        "ListOps: nested [MAX [MIN [MED [SM over digits with brackets, its value (10 classes) "
        "at the closing bracket"
    )

    def __post_init__(self) -> None:
        _check_int("seq_len", self.seq_len, 8)
        _check_int("max_depth", self.max_depth, 1)
        _check_int("max_args", self.max_args, 2)
        if self.min_len is not None:
            _check_int("min_len", self.min_len, 4)
            if self.min_len > self.seq_len:
                raise ValueError(
                    f"min_len: expected at most seq_len = {self.seq_len}, got {self.min_len}"
                )

    @property
    def num_tokens(self) -> int:
        return len(LISTOPS_VOCAB)

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def shortest(self) -> int:
        return max(4, self.seq_len // 4 if self.min_len is None else self.min_len)

    def expression(self, rng: random.Random) -> tuple[list[str], int]:
        """One expression (its tokens) of shortest..seq_len tokens, and its value."""
        for _ in range(1000):  # a tree that stopped short of `shortest` is drawn again
            tokens: list[str] = []
            value = _write(self._grow(rng), tokens)
            if len(tokens) >= self.shortest:
                return tokens, value
        raise ValueError(
            f"listops: no expression of {self.shortest}..{self.seq_len} tokens in 1000 draws "
            f"with max_depth={self.max_depth}, max_args={self.max_args}; raise them or lower "
            "min_len"
        )

    def _grow(self, rng: random.Random) -> list:
        """A tree [op, children] (children: digits or trees) of at most seq_len tokens, grown
        towards a length drawn from shortest..seq_len."""
        uniform = rng.random  # int(uniform() * k): uniform over 0..k-1, 3x faster than randrange
        target = self.shortest + int(uniform() * (self.seq_len - self.shortest + 1))
        leaves: list[tuple[list, int, int]] = []  # (siblings, index, depth) of growable digits

        def operator(depth: int, budget: int) -> list:
            """A new operator node over 2..min(max_args, budget) digits, which join the
            growable leaves."""
            count = 2 + int(uniform() * (min(self.max_args, budget) - 1))
            node: list = [OPERATORS[int(uniform() * len(OPERATORS))], []]
            for i in range(count):
                node[1].append(int(uniform() * 10))
                if depth < self.max_depth:
                    leaves.append((node[1], i, depth + 1))
            return node

        root = operator(1, max(2, target - 2))
        length = len(root[1]) + 2  # tokens: "[OP", the digits, "]"
        while leaves and target - length >= 3:  # an operator over 2 digits adds 3 tokens
            pick = int(uniform() * len(leaves))
            leaves[pick], leaves[-1] = leaves[-1], leaves[pick]
            siblings, i, depth = leaves.pop()
            siblings[i] = operator(depth, target - length - 1)
            length += len(siblings[i][1]) + 1  # a digit became "[OP" + k digits + "]"
        return root

    def batch(self, size: int, rng: np.random.Generator) -> Batch:
        n = self.seq_len
        inputs = np.zeros((size, n, 1), dtype=np.int64)
        targets = np.full((size, n), IGNORE, dtype=np.int64)
        draw = random.Random(int(rng.integers(2**63)))  # Python's: 20x faster per scalar draw
        for i in range(size):
            tokens, value = self.expression(draw)
            inputs[i, : len(tokens), 0] = [_TOKEN_ID[t] for t in tokens]
            targets[i, len(tokens) - 1] = value
        return Batch(torch.from_numpy(inputs), torch.from_numpy(targets))

    def shortcut_accuracy(self, batches: Sequence[Batch]) -> float:
        """The outermost operator alone (the first token): its most frequent value on
        ``batches`` (MAX of many digits is mostly 9, MIN mostly 0). LRA's ListOps scores
        (about 36%) are close to this."""
        first = torch.cat([b.inputs[:, 0, 0] for b in batches])
        targets = torch.cat([b.targets.max(dim=1).values for b in batches])
        return _best_by_group(first, targets)


def _best_by_group(groups: Tensor, targets: Tensor) -> float:
    """Accuracy of answering, for each group id, the group's most frequent target."""
    right = 0
    for g in groups.unique():
        right += int(torch.bincount(targets[groups == g]).max())
    return right / max(len(targets), 1)


def _write(node: list | int, out: list[str]) -> int:
    """Append the tokens of ``node`` (a digit, or [op, children]) to ``out``; its value."""
    if isinstance(node, int):
        out.append(str(node))
        return node
    op, children = node
    out.append(op)
    value = apply_operator(op, [_write(child, out) for child in children])
    out.append("]")
    return value


def decode_listops(ids: Sequence[int]) -> list[str]:
    """Token ids of one listops sequence (padding dropped) -> its tokens."""
    return [LISTOPS_VOCAB[i] for i in ids if i != 0]


def _option_names(cls: type[Task]) -> list[str]:
    """The options of a task: its dataclass fields but seq_len (an axis of its own)."""
    return [f.name for f in dataclasses.fields(cls) if f.name != "seq_len"]


def task_names() -> list[str]:
    return sorted(TASKS)


def task_option_names(name: str) -> list[str]:
    return _option_names(task_class(name))


def task_class(name: str) -> type[Task]:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(
            f"task: unknown task {name!r} (known: {', '.join(task_names())})"
        ) from None


def make_task(name: str, seq_len: int, options: dict[str, Any] | None = None) -> Task:
    """The task ``name`` at ``seq_len`` with ``options`` (``vocab_size``, ``num_kv_pairs``,
    ...); an unknown option or a bad value raises ValueError, naming it."""
    cls = task_class(name)
    names = _option_names(cls)
    options = dict(options or {})
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(
            f"task {name!r}: unknown option{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))} (valid: {', '.join(names)})"
        )
    return cls(seq_len, **options)
