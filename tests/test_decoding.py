"""Decoding with a state, and grouped-query heads, for every registered backend:

- a backend that decodes gives, prompt prefilled in one call or in chunks of 1 to 7 tokens then
  decoded token by token, its own causal forward over the whole sequence (float64, 1e-6), with
  and without key padding, with Hkv = H, 2 and 1 key/value heads;
- ``state.nbytes`` is the declared formula, constant in N where the state is;
- a backend that cannot decode refuses with the reason;
- every backend with Hkv in {1, 2} key/value heads equals itself on K/V repeated to H heads;
- bad calls name the argument.
"""

from __future__ import annotations

import random

import pytest
import torch

import effattn
from effattn.backends.kv_cache import MIN_CAPACITY

B, H, D, N = 2, 4, 8, 29
CPU_BACKENDS = [
    name
    for name in effattn.list_backends()
    if "cpu" in effattn.backend_class(name).devices
    and torch.float64 in effattn.backend_class(name).dtypes
]
SMALL = {  # small options: several windows, chunks and features within N
    "local": {"window": 5},
    "linear": {"chunk_size": 4},
    "performer": {"num_features": 16, "chunk_size": 4},
    "strided": {"window": 3, "stride": 4},
    "lsh": {"bucket_size": 4, "n_hashes": 2},
    "xl": {"segment_len": 8, "mem_len": 8},
    "bigbird": {"block_size": 4},
    "linformer": {"rank": 8},
    "nystrom": {"landmarks": 4},
}


def _backend(name: str) -> effattn.Backend:
    return effattn.get_backend(name, **SMALL.get(name, {}))


def _decodes(backend: effattn.Backend) -> bool:
    try:
        effattn.decode_state(backend, batch=1, heads=1, head_dim=D, dtype=torch.float64)
    except ValueError:
        return False
    return True


DECODING = [name for name in CPU_BACKENDS if _decodes(_backend(name))]
REFUSING = [name for name in CPU_BACKENDS if name not in DECODING]


def _inputs(kv_heads: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, dtype=torch.float64, generator=gen)
    k = torch.randn(B, kv_heads, N, D, dtype=torch.float64, generator=gen)
    v = torch.randn(B, kv_heads, N, D, dtype=torch.float64, generator=gen)
    keep = torch.rand(B, N, generator=gen) > 0.25
    keep[:, 0] = True
    return q, k, v, keep


def test_the_decoding_backends_are_the_ones_with_a_state():
    assert {"full", "sdpa", "local", "linear", "performer"} <= set(DECODING)
    for name in DECODING:
        assert effattn.backend_class(name).state_complexity != "-"


@pytest.mark.parametrize("name", DECODING)
@pytest.mark.parametrize("kv_heads", [H, 2, 1])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("prefill", ["one call", "chunks", "extend"])
def test_decoding_equals_the_causal_forward(name, kv_heads, padded, prefill):
    backend = _backend(name)
    q, k, v, keep = _inputs(kv_heads)
    mask = keep if padded else None
    expected = backend(q, k, v, causal=True, key_padding_mask=mask)  # (B, H, N, D)
    state = effattn.decode_state(
        backend, batch=B, heads=H, kv_heads=kv_heads, head_dim=D, dtype=torch.float64
    )
    prompt, outputs, rng = 13, [], random.Random(0)

    def call(start: int, stop: int) -> torch.Tensor:
        part = slice(start, stop)
        return effattn.attention(
            q[:, :, part],
            k[:, :, part],
            v[:, :, part],
            backend,
            causal=True,
            key_padding_mask=None if mask is None else mask[:, part],
            state=state,
        )

    if prefill == "extend":  # no outputs for the prompt
        state.extend(k[:, :, :prompt], v[:, :, :prompt], None if mask is None else mask[:, :prompt])
    elif prefill == "one call":
        outputs.append(call(0, prompt))
    else:
        start = 0
        while start < prompt:
            stop = min(start + rng.randint(1, 7), prompt)
            outputs.append(call(start, stop))
            start = stop
    for position in range(prompt, N):  # token by token
        outputs.append(call(position, position + 1))
    assert state.length == N
    got = torch.cat(outputs, dim=2)
    want = expected[:, :, prompt:] if prefill == "extend" else expected
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _expected_nbytes(name: str, state, length: int, kv_heads: int, padded: bool) -> int:
    """The declared state size: K/V cache 2*B*Hkv*capacity*D (+ B*capacity mask bytes); window
    ring 2*B*Hkv*min(N, w)*D (+ B*min(N, w)); running sums B*H*m*(D + 1) (+ B*H stabilisers
    for FAVOR+'s logarithmic features); 8 bytes a float64."""
    if name in ("full", "sdpa"):
        cap = state.capacity
        return 2 * B * kv_heads * cap * D * 8 + (B * cap if padded else 0)
    if name == "local":
        ring = min(length, SMALL["local"]["window"])
        return 2 * B * kv_heads * ring * D * 8 + (B * ring if padded else 0)
    if name == "linear":
        return B * H * D * (D + 1) * 8
    if name == "performer":
        m = SMALL["performer"]["num_features"]
        return (B * H * m * (D + 1) + B * H) * 8
    raise AssertionError(f"no declared formula for {name}")


@pytest.mark.parametrize("name", DECODING)
@pytest.mark.parametrize("padded", [False, True])
def test_state_bytes_follow_the_declared_formula(name, padded):
    kv_heads = 2
    _, k, v, keep = _inputs(kv_heads)
    state = effattn.decode_state(
        _backend(name), batch=B, heads=H, kv_heads=kv_heads, head_dim=D, dtype=torch.float64
    )
    sizes = {}
    for length in (3, 11, N):
        part = slice(state.length, length)
        state.extend(k[:, :, part], v[:, :, part], keep[:, part] if padded else None)
        assert state.nbytes == _expected_nbytes(name, state, length, kv_heads, padded)
        sizes[length] = state.nbytes
    if effattn.backend_class(name).state_complexity in ("O(1)", "O(w)"):  # constant in N
        assert sizes[11] == sizes[N]


def test_the_kv_cache_appends_in_amortised_constant_time():
    state = effattn.decode_state("sdpa", batch=1, heads=2, head_dim=4, dtype=torch.float64)
    k = torch.randn(1, 2, 1, 4, dtype=torch.float64)
    grown = set()
    for _ in range(300):
        state.extend(k, k)
        grown.add(state.capacity)
    assert state.length == 300
    assert sorted(grown) == [MIN_CAPACITY * 2**i for i in range(len(grown))]  # doubling
    assert state.capacity < 2 * state.length


def test_grouped_heads_keep_a_smaller_cache():
    full = effattn.decode_state("sdpa", batch=1, heads=32, kv_heads=32, head_dim=8)
    grouped = effattn.decode_state("sdpa", batch=1, heads=32, kv_heads=8, head_dim=8)
    for state, kv_heads in ((full, 32), (grouped, 8)):
        state.extend(torch.randn(1, kv_heads, 40, 8), torch.randn(1, kv_heads, 40, 8))
    assert grouped.nbytes * 4 == full.nbytes


@pytest.mark.parametrize("name", REFUSING)
def test_a_backend_that_cannot_decode_says_why(name):
    with pytest.raises(ValueError, match=rf"backend '{name}' cannot decode[^:]*: \S+"):
        effattn.decode_state(_backend(name), batch=1, heads=2, head_dim=D)


@pytest.mark.parametrize(
    ("options", "why"),
    [({"num_global": 2}, "num_global=2"), ({"blocked": True, "window": 4}, "blocked=True")],
)
def test_local_refuses_the_variants_a_ring_cannot_hold(options, why):
    with pytest.raises(ValueError, match=why):
        effattn.decode_state("local", batch=1, heads=2, head_dim=D, **options)


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_heads_equal_repeated_heads(name, kv_heads):
    backend = _backend(name)
    q, k, v, keep = _inputs(kv_heads, seed=1)
    causal = backend.supports_causal
    mask = keep if backend.supports_padding_mask else None
    grouped = backend(q, k, v, causal=causal, key_padding_mask=mask)
    groups = H // kv_heads
    repeated = backend(
        q,
        k.repeat_interleave(groups, dim=1),
        v.repeat_interleave(groups, dim=1),
        causal=causal,
        key_padding_mask=mask,
    )
    torch.testing.assert_close(grouped, repeated, rtol=1e-9, atol=1e-9)


def _state(**kwargs):
    args = {"batch": B, "heads": H, "kv_heads": 2, "head_dim": D, "dtype": torch.float64}
    return effattn.decode_state("sdpa", **{**args, **kwargs})


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda s, q, k, v: effattn.attention(q, k, v, "sdpa", state=s), r"causal: expected True"),
        (
            lambda s, q, k, v: effattn.attention(q, k, v, "full", causal=True, state=s),
            r"state: expected a state of",
        ),
        (
            lambda s, q, k, v: effattn.attention(q[:, :, :2], k, v, "sdpa", causal=True, state=s),
            r"one query per new key",
        ),
        (
            lambda s, q, k, v: effattn.attention(q[:, :2], k, v, "sdpa", causal=True, state=s),
            r"\(B, H, Hkv, D\)",
        ),
        (
            lambda s, q, k, v: effattn.attention(q, k, v, "sdpa", causal=True, scale=0.5, state=s),
            r"scale: expected the state's scale",
        ),
        (
            lambda s, q, k, v: effattn.attention(
                q.float(), k.float(), v.float(), "sdpa", causal=True, state=s
            ),
            r"q: expected dtype torch.float64",
        ),
        (
            lambda s, q, k, v: effattn.attention(
                q.requires_grad_(), k, v, "sdpa", causal=True, state=s
            ),
            r"decoding with a state is inference",
        ),
        (
            lambda s, q, k, v: effattn.attention(q, k, v, "sdpa", causal=True, state="cache"),
            r"state: expected a DecodeState",
        ),
    ],
)
def test_bad_decoding_calls_name_the_argument(call, pattern):
    q, k, v, _ = _inputs(2)
    q, k, v = q[:, :, :3].clone(), k[:, :, :3], v[:, :, :3]
    with pytest.raises((ValueError, TypeError), match=pattern):
        call(_state(), q, k, v)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"kv_heads": 3}, r"kv_heads: expected a divisor of heads=4"),
        ({"batch": 0}, r"'batch' expected an int >= 1"),
        ({"dtype": torch.int32}, r"dtype: expected a floating dtype"),
    ],
)
def test_bad_state_arguments_are_refused(kwargs, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        _state(**kwargs)


def test_a_bidirectional_backend_refuses_with_its_reason():
    with pytest.raises(ValueError, match=r"'bigbird' cannot decode: causal=True"):
        effattn.decode_state("bigbird", batch=1, heads=2, head_dim=D)


@pytest.mark.parametrize("name", DECODING)
def test_rewind_goes_back_to_a_mark(name):
    backend = _backend(name)
    q, k, v, _ = _inputs(2)
    state = effattn.decode_state(
        backend, batch=B, heads=H, kv_heads=2, head_dim=D, dtype=torch.float64
    )
    state.extend(k[:, :, :20], v[:, :, :20])
    mark, size = state.mark(), state.nbytes
    token = slice(20, 21)
    first = state.attend(q[:, :, token], k[:, :, token], v[:, :, token])
    state.attend(q[:, :, 21:23], k[:, :, 21:23], v[:, :, 21:23])
    state.rewind(mark)
    assert state.length == 20
    if backend.state_complexity != "O(N)":  # a cache keeps its capacity; the others shrink back
        assert state.nbytes == size
    again = state.attend(q[:, :, token], k[:, :, token], v[:, :, token])
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"mark: expected one made at a length <= 21"):
        state.rewind((25, None))


def test_reserve_makes_room_once():
    state = effattn.decode_state("full", batch=1, heads=2, head_dim=4, dtype=torch.float64)
    state.reserve(100)
    assert state.capacity == 100 and state.length == 0
    k = torch.randn(1, 2, 100, 4, dtype=torch.float64)
    state.extend(k, k)
    assert state.capacity == 100 and state.nbytes == 2 * 2 * 100 * 4 * 8
    linear = effattn.decode_state("linear", batch=1, heads=2, head_dim=4)
    linear.reserve(10**6)  # a state of a fixed size needs no room
    assert linear.nbytes == 0
