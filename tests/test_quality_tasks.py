"""The quality tasks' generators: labels equal what the inputs say, answers are where the task
says, and the same seed gives the same data (effattn.quality.tasks)."""

from __future__ import annotations

import pytest
import torch

from effattn.quality.tasks import (
    IGNORE,
    LISTOPS_VOCAB,
    OPERATORS,
    decode_listops,
    make_task,
    stream_rng,
)


def evaluate_tokens(tokens: list[str]) -> int:
    """An independent evaluator: a stack machine over the token list (not the generator's
    tree). MED is the lower median, SM the sum mod 10."""
    stack: list[list] = []
    result = None
    for tok in tokens:
        if tok in OPERATORS:
            stack.append([tok])
        elif tok == "]":
            op, *args = stack.pop()
            args = sorted(args)
            value = {
                "[MAX": args[-1],
                "[MIN": args[0],
                "[MED": args[(len(args) - 1) // 2],
                "[SM": sum(args) % 10,
            }[op]
            if stack:
                stack[-1].append(value)
            else:
                result = value
        else:
            stack[-1].append(int(tok))
    assert not stack and result is not None, "unbalanced expression"
    return result


@pytest.mark.parametrize("n", [32, 128, 512])
def test_listops_labels_are_the_value_of_their_expressions(n):
    task = make_task("listops", n)
    batch = task.batch(64, stream_rng("train", 3))
    assert batch.inputs.shape == (64, n, 1)
    for inputs, targets in zip(batch.inputs[..., 0], batch.targets, strict=True):
        tokens = decode_listops(inputs.tolist())
        assert task.shortest <= len(tokens) <= n
        assert tokens[0] in OPERATORS and tokens[-1] == "]"  # brackets stay in the input
        assert tokens.count("]") == sum(t in OPERATORS for t in tokens) >= 1
        assert (inputs[len(tokens) :] == 0).all()  # padding after the expression
        last = len(tokens) - 1
        assert int(targets[last]) == evaluate_tokens(tokens)
        assert (targets != IGNORE).nonzero()[:, 0].tolist() == [last]  # only its last token


def test_listops_depth_and_arguments_within_options():
    task = make_task("listops", 256, {"max_depth": 3, "max_args": 4})
    batch = task.batch(32, stream_rng("train", 0))
    for inputs in batch.inputs[..., 0]:
        depth = deepest = 0
        counts: list[int] = []
        for tok in decode_listops(inputs.tolist()):
            if tok in OPERATORS:
                if counts:
                    counts[-1] += 1
                depth += 1
                deepest = max(deepest, depth)
                counts.append(0)
            elif tok == "]":
                depth -= 1
                assert 2 <= counts.pop() <= 4
            else:
                counts[-1] += 1
        assert deepest <= 3


def test_listops_evaluator_is_the_documented_one():
    text = "[SM 9 [MED 3 1 7 5 ] [MAX 2 8 ] [MIN 4 6 ] ]"  # 9 + 3 + 8 + 4 = 24
    tokens = text.split(" ")
    assert evaluate_tokens(tokens) == 4
    assert set(LISTOPS_VOCAB[1:11]) == {str(d) for d in range(10)}


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("mqar", {}),
        ("listops", {}),
        ("nearest_recall", {}),
    ],
)
def test_same_seed_same_data_other_seed_other_data(name, options):
    task = make_task(name, 256, options)
    a = task.batch(8, stream_rng("train", 5))
    b = task.batch(8, stream_rng("train", 5))
    c = task.batch(8, stream_rng("train", 6))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)
    # validation and test are fixed streams, apart from every training stream and each other
    val, test = task.batch(8, stream_rng("val", 5)), task.batch(8, stream_rng("test", 5))
    assert torch.equal(val.inputs, task.batch(8, stream_rng("val", 9)).inputs)
    assert not torch.equal(val.inputs, test.inputs) and not torch.equal(val.inputs, a.inputs)


def _pairs(inputs: torch.Tensor) -> dict[int, tuple[int, int]]:
    """Position -> (key, value) of the positions that hold both."""
    both = (inputs[:, 0] > 0) & (inputs[:, 1] > 0)
    return {int(p): (int(inputs[p, 0]), int(inputs[p, 1])) for p in both.nonzero()[:, 0]}


def test_mqar_answers_are_the_stored_values():
    task = make_task("mqar", 256, {"num_kv_pairs": 16, "vocab_size": 128})
    half = 64
    batch = task.batch(32, stream_rng("train", 1))
    assert batch.inputs.shape == (32, 256, 2)
    distances = []
    for inputs, targets, sources in zip(batch.inputs, batch.targets, batch.sources, strict=True):
        pairs = _pairs(inputs)
        assert len(pairs) == 16 and max(pairs) < 128  # the pairs: in the first half
        keys = [k for k, _ in pairs.values()]
        assert len(set(keys)) == 16 and all(1 <= k <= half for k in keys)  # distinct keys
        assert all(half < v <= 2 * half for _, v in pairs.values())  # values: their own range
        scored = (targets != IGNORE).nonzero()[:, 0].tolist()
        assert len(scored) == 16 and min(scored) >= 128  # the queries: in the second half
        store = dict(pairs.values())
        for q in scored:
            key = int(inputs[q, 0])
            assert int(inputs[q, 1]) == 0  # a query carries the key alone
            assert key in store  # every queried key was stored
            assert int(targets[q]) == store[key] - half - 1  # the value stored for that key
            assert pairs[int(sources[q])][0] == key
            distances.append(q - int(sources[q]))
        # only the answer positions are scored: every other position, pairs included, is not
        unscored = torch.ones(256, dtype=torch.bool)
        unscored[scored] = False
        assert (targets[unscored] == IGNORE).all() and (sources[unscored] == -1).all()
        unscored[list(pairs)] = False
        assert (inputs[unscored] == 0).all()  # every other position is blank
    # key-query distances span the sequence
    assert min(distances) < 16 and max(distances) > 240


def test_nearest_recall_answer_is_the_nearest_definition():
    task = make_task("nearest_recall", 128, {"block_len": 16, "num_kv_pairs": 4})
    batch = task.batch(16, stream_rng("train", 2))
    for inputs, targets, sources in zip(batch.inputs, batch.targets, batch.sources, strict=True):
        pairs = _pairs(inputs)
        for q in (targets != IGNORE).nonzero()[:, 0].tolist():
            key = int(inputs[q, 0])
            definitions = sorted((abs(q - p), p) for p, (k, _) in pairs.items() if k == key)
            (near, where), *others = definitions
            assert where == int(sources[q]) and where // 16 == q // 16 and near < 16
            assert all(d > 16 for d, _ in others)  # every other definition is out of the block
            assert len(others) == 128 // 32 - 1  # defined again in every block of its parity
            assert int(targets[q]) == pairs[where][1] - 2 * 4 - 1


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("mqar", {"num_pairs": 4}, "unknown option 'num_pairs'"),
        ("mqar", {"num_kv_pairs": 100, "vocab_size": 64}, "num_kv_pairs"),
        ("nearest_recall", {"block_len": 30}, "block_len"),
        ("nearest_recall", {"block_len": 8, "num_kv_pairs": 6}, "num_queries"),
        ("listops", {"max_args": 1}, "max_args"),
        ("sorting", {}, "unknown task 'sorting'"),
    ],
)
def test_bad_task_options_name_the_option(name, options, message):
    with pytest.raises(ValueError, match=message):
        make_task(name, 256, options)
