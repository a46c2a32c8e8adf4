"""Properties of the sparse patterns, checked against explicit loops, independently of the
backends' computation: the band, global rows and columns, strided keys, BigBird's random blocks
(count, no duplicates, not window or global, seeded), and density that falls as N grows."""

from __future__ import annotations

import pytest
import torch

import effattn
from effattn.patterns import and_, blocked, causal, dense_mask, global_tokens, sliding_window
from effattn.patterns import strided as strided_keys


def _loops(n_q: int, n_k: int, keep) -> torch.Tensor:
    return torch.tensor([[bool(keep(i, j)) for j in range(n_k)] for i in range(n_q)])


@pytest.mark.parametrize(("n_q", "n_k"), [(9, 9), (5, 9), (9, 5)])
@pytest.mark.parametrize("w", [0, 1, 3])
def test_sliding_window_is_the_inclusive_band(n_q: int, n_k: int, w: int):
    o = n_k - n_q
    band = dense_mask(sliding_window(w, o), n_q, n_k)
    assert torch.equal(band, _loops(n_q, n_k, lambda i, j: abs(j - (i + o)) <= w))
    causal_band = dense_mask(and_(causal(n_q, n_k), sliding_window(w, o)), n_q, n_k)
    assert torch.equal(causal_band, _loops(n_q, n_k, lambda i, j: 0 <= i + o - j <= w))


def test_blocked_global_and_strided_predicates():
    assert torch.equal(dense_mask(blocked(3), 7, 7), _loops(7, 7, lambda i, j: i // 3 == j // 3))
    glob = dense_mask(global_tokens(2), 6, 6)
    assert glob[:2].all() and glob[:, :2].all() and not glob[2:, 2:].any()
    assert torch.equal(dense_mask(strided_keys(3), 4, 9), _loops(4, 9, lambda i, j: j % 3 == 2))
    assert sliding_window(256).__name__ == "sliding_window_256"


def _mask(name: str, n: int, causal_: bool = False, heads: int = 1, **options) -> torch.Tensor:
    backend = effattn.get_backend(name, **options)
    x = torch.zeros(1, heads, n, 4)
    return backend.pattern(x, x, x, causal=causal_).mask[0]  # (H or 1, N, N)


def test_local_pattern_with_global_tokens():
    n, w, g = 20, 2, 3
    mask = _mask("local", n, window=w, num_global=g)[0]
    assert torch.equal(mask, _loops(n, n, lambda i, j: abs(i - j) <= w or i < g or j < g))
    mask = _mask("local", n, True, window=w, num_global=g)[0]
    assert torch.equal(mask, _loops(n, n, lambda i, j: j <= i and (i - j <= w or i < g or j < g)))


def test_strided_pattern_band_plus_every_stride_th_key():
    n = 30
    mask = _mask("strided", n, window=2, stride=5)[0]
    assert torch.equal(mask, _loops(n, n, lambda i, j: abs(i - j) <= 2 or j % 5 == 4))
    mask = _mask("strided", n, True, window=2, stride=5)[0]
    assert torch.equal(mask, _loops(n, n, lambda i, j: j <= i and (i - j <= 2 or j % 5 == 4)))
    default = effattn.get_backend("strided")
    assert default.resolved(4096) == (64, 64)  # ceil(sqrt(N))


def _bigbird_table(n: int, heads: int = 4, **options) -> tuple[torch.Tensor, effattn.Backend]:
    backend = effattn.get_backend("bigbird", block_size=4, **options)
    return backend.block_table(n, n, heads, torch.device("cpu")), backend


def test_bigbird_blocks_window_global_random():
    n, b, r = 4 * 20, 4, 3
    table, backend = _bigbird_table(n, num_random_blocks=r)
    nb = n // b
    lists = backend.key_blocks(n, n, 4, torch.device("cpu"))  # (H, nb, 3 + 2 + 3)
    assert table[:, [0, nb - 1]].all()  # global query blocks see everything
    assert table[:, :, [0, nb - 1]].all()  # every block sees the global key blocks
    for t in range(1, nb - 1):
        window = {s for s in (t - 1, t, t + 1) if 0 <= s < nb}
        assert table[:, t, sorted(window)].all()
        randoms = lists[:, t, -r:]
        for h in range(4):
            picked = randoms[h].tolist()
            assert len(set(picked)) == r  # no duplicates
            assert not set(picked) & (window | {0, nb - 1})  # neither window nor global
            assert int(table[h, t].sum()) == len(window | {0, nb - 1}) + r
    assert not torch.equal(table[0], table[1])  # drawn per head


def test_bigbird_random_blocks_are_seeded_and_fixed():
    first, _ = _bigbird_table(96, seed=1)
    again, _ = _bigbird_table(96, seed=1)
    other, _ = _bigbird_table(96, seed=2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # The pattern of a call is the same on every call (not redrawn).
    backend = effattn.get_backend("bigbird", block_size=4)
    x = torch.randn(1, 2, 96, 4)
    assert torch.equal(backend.pattern(x, x, x).mask, backend.pattern(x, x, x).mask)


def test_bigbird_short_sequence_falls_back_to_dense():
    table, backend = _bigbird_table(4 * 7)  # 7 blocks < 3 + 2 + 3
    assert backend.is_dense(28) and table.all()


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("local", {"window": 8}),
        ("local", {"window": 8, "num_global": 2}),
        ("strided", {}),
        ("bigbird", {"block_size": 8}),
    ],
)
def test_density_falls_as_n_grows(name: str, options: dict):
    densities = [float(_mask(name, n, **options).float().mean()) for n in (128, 256, 512)]
    assert densities[0] > densities[1] > densities[2]
