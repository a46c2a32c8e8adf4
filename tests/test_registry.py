"""The registry: listing, building with checked options, and registering a user's backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import torch

import effattn
from effattn.registry import parse_option_value
from tests.pattern_check import assert_matches_pattern


def test_builtins_are_listed():
    names = effattn.list_backends()
    assert {"full", "sdpa"} <= set(names)
    assert names == sorted(names)


def test_declarations_are_complete():
    for name in effattn.list_backends():
        row = effattn.backend_class(name).declaration()
        assert row["backend"] == name
        for key in ("exact", "causal", "devices", "dtypes", "complexity", "class"):
            assert row[key] not in (None, ""), f"{name} declares no {key}"


def test_a_user_backend_in_a_few_lines(scratch_registry):
    @effattn.register_backend("tempered")
    @dataclass(frozen=True)
    class TemperedAttention(effattn.Backend):
        temperature: float = 1.0  # divides the scores
        mode: Literal["a", "b"] = "a"  # an option with fixed choices

        def forward(self, q, k, v, *, causal, key_padding_mask, scale):
            full = effattn.get_backend("full")
            return full(
                q,
                k,
                v,
                causal=causal,
                key_padding_mask=key_padding_mask,
                scale=scale / self.temperature,
            )

    assert "tempered" in effattn.list_backends()
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64) for _ in range(3))
    out = effattn.attention(q, k, v, "tempered", temperature=2.0)
    ref = effattn.attention(q, k, v, "full", scale=0.25)
    torch.testing.assert_close(out, ref)
    with pytest.raises(TypeError, match=r"option 'temperature' expected float, got str"):
        effattn.get_backend("tempered", temperature="hot")
    with pytest.raises(TypeError, match=r"option 'mode' expected"):
        effattn.get_backend("tempered", mode="c")
    with pytest.raises(ValueError, match=r"unknown option 'temp' \(valid: temperature, mode\)"):
        effattn.get_backend("tempered", temp=2.0)
    assert parse_option_value(TemperedAttention, "temperature", "0.5") == 0.5
    assert parse_option_value(TemperedAttention, "mode", "b") == "b"
    with pytest.raises(ValueError, match=r"option 'temperature' expected float, got 'x'"):
        parse_option_value(TemperedAttention, "temperature", "x")


def test_registration_errors(scratch_registry):
    class NotADataclass(effattn.Backend):
        pass

    with pytest.raises(TypeError, match=r"must be decorated with @dataclass\(frozen=True\)"):
        effattn.register_backend("nope")(NotADataclass)
    with pytest.raises(TypeError, match=r"expected a Backend subclass"):
        effattn.register_backend("nope")(int)
    with pytest.raises(ValueError, match=r"the name 'full' is taken"):

        @effattn.register_backend("full")
        @dataclass(frozen=True)
        class Impostor(effattn.Backend):
            pass


def test_backend_instances_are_accepted():
    q, k, v = (torch.randn(1, 1, 4, 4, dtype=torch.float64) for _ in range(3))
    be = effattn.get_backend("sdpa")
    assert_matches_pattern(be, q, k, v)
    torch.testing.assert_close(effattn.attention(q, k, v, be), be(q, k, v))
    with pytest.raises(ValueError, match=r"options .* were given with a backend instance"):
        effattn.attention(q, k, v, be, window=3)
