"""The backend contract: what every attention backend declares, how it is called, and how it shows
what it attends to.

A backend is a frozen dataclass whose fields are its options (``window``, ``block_size``, ...),
registered with :func:`effattn.register_backend`. Its capabilities are class attributes, so a sweep
can explain a skip before it builds any tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from effattn._validate import resolve_scale, validate_flag, validate_key_padding_mask, validate_qkv
from effattn.ops import attention_flops, keep_mask, pair_count, repeat_kv_heads
from effattn.patterns import Pattern, Predicate, dense_mask
from effattn.reference import pattern_probabilities

if TYPE_CHECKING:
    from effattn.decoding import DecodeState, StateShape

_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}


# What a refused call says, per support flag (closed by the backend's why_unsupported, if any).
_REFUSALS = {
    "causal": "causal=True (this backend is bidirectional only",
    "bidirectional": "causal=False (this backend is causal only",
    "padding_mask": "key_padding_mask (not supported by this backend",
    "backward": "backward (this backend is forward-only",
}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def predicate_pattern(
    predicate: Callable[..., Predicate],
    q: Tensor,
    k: Tensor,
    causal: bool,
    key_padding_mask: Tensor | None,
) -> Pattern:
    """The dense Pattern of ``predicate(Nq, Nk, causal=causal)`` with key padding (tests and
    pictures only). q: (B, H, Nq, D), k: (B, H, Nk, D); mask (B or 1, H or 1, Nq, Nk)."""
    q_len, kv_len = q.shape[2], k.shape[2]
    pred = predicate(q_len, kv_len, causal=causal)
    mask = dense_mask(pred, q_len, kv_len, q.device)  # (Nq, Nk), or (H, Nq, Nk) with a head dim
    mask = mask if mask.dim() == 3 else mask[None]  # (Nq, Nk) -> (1, Nq, Nk)
    mask = mask[None]  # (H or 1, Nq, Nk) -> (1, H or 1, Nq, Nk)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]  # (B, Nk) -> (B, 1, 1, Nk)
    return Pattern(mask=mask)


@dataclass(frozen=True)
class Backend:
    """Base class of every attention backend. Subclasses are frozen dataclasses (their fields are
    the options) registered with :func:`effattn.register_backend`, and implement :meth:`forward`
    and, if they attend to fewer pairs than dense attention, :meth:`pattern` and :meth:`flops`.
    """

    name: ClassVar[str] = ""  # set by register_backend
    # True if the output equals full attention (softmax over every pair that causality and key
    # padding allow); False for backends that attend to a subset (sparse, LSH, segments).
    exact: ClassVar[bool] = True
    supports_causal: ClassVar[bool] = True
    supports_bidirectional: ClassVar[bool] = True  # False for inherently causal ones (recurrence)
    supports_padding_mask: ClassVar[bool] = True
    supports_backward: ClassVar[bool] = True
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
    )
    # Why a call the flags above refuse cannot be supported, in a user's words, keyed by
    # "causal", "bidirectional", "padding_mask", "backward"; shown by not_supported_reasons.
    why_unsupported: ClassVar[dict[str, str]] = {}
    # True if the backend attends over a subset of (query, key) pairs that pattern() shows;
    # False for low-rank and kernel backends (pattern() raises; attention_matrix() is their
    # picture and reference() their dense formula).
    has_pattern: ClassVar[bool] = True
    # True if forward() takes k, v with fewer heads than q (grouped-query attention) itself;
    # otherwise __call__ repeats them to every query head first (a copy).
    native_gqa: ClassVar[bool] = False
    # What decode_state() keeps, per sequence, in O-notation of the positions N seen so far
    # ("O(N)": a K/V cache, "O(w)": a window, "O(1)": running sums); "-": it cannot decode.
    state_complexity: ClassVar[str] = "-"
    # Why a backend that cannot decode with a state cannot (shown by decode_state's refusal).
    decode_refusal: ClassVar[str] = "it has no decoding state"
    complexity: ClassVar[str] = "O(N^2)"  # time, as in Tay et al.'s survey table
    memory_complexity: ClassVar[str] = "O(N^2)"  # extra memory beyond q, k, v and the output
    tay_class: ClassVar[str] = "-"  # FP, LP, LR, KR, M, RC, DS (Tay et al.); "-" for exact dense
    description: ClassVar[str] = ""

    # -- the call ---------------------------------------------------------------------------
    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        scale: float | None = None,
    ) -> Tensor:
        """Attention over q: (B, H, Nq, D), k, v: (B, H, Nk, D); returns (B, H, Nq, D).

        k and v may have Hkv heads with H % Hkv == 0 (grouped-query attention, SDPA's
        ``enable_gqa`` layout: query head h reads key/value head h // (H / Hkv)); a backend
        without ``native_gqa`` gets them repeated to H heads.
        key_padding_mask: (B, Nk) bool, True = the key takes part (SDPA's convention).
        causal: the last query is aligned with the last key (see effattn.patterns.causal).
        scale: the softmax scale, 1/sqrt(D) when None.
        """
        resolved = self._checked(q, k, v, causal, key_padding_mask, scale, grouped=True)
        return self.grouped_forward(
            q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=resolved
        )

    def grouped_forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool,
        key_padding_mask: Tensor | None,
        scale: float,
    ) -> Tensor:
        """:meth:`forward` on checked inputs whose k, v may have fewer heads than q: passed as
        they are to a backend with ``native_gqa``, repeated to q's heads for the others."""
        if k.shape[1] != q.shape[1] and not self.native_gqa:
            k, v = repeat_kv_heads(k, q.shape[1]), repeat_kv_heads(v, q.shape[1])
        return self.forward(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)

    def _checked(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        causal: bool,
        key_padding_mask: Tensor | None,
        scale: float | None,
        *,
        dense: bool = False,
        grouped: bool = False,
    ) -> float:
        """Check a call's inputs and this backend's support for it; the resolved scale.
        ``dense``: for reference() and attention_matrix(), which run on any device and dtype;
        ``grouped``: k, v may have fewer heads than q (the call; the dense forms take H)."""
        validate_qkv(q, k, v, grouped=grouped)
        validate_flag("causal", causal)
        validate_key_padding_mask(key_padding_mask, q, k)
        resolved = resolve_scale(scale, q.shape[-1])
        if dense:  # a dense formula runs on any device and dtype
            reasons = self._mode_reasons(
                causal=causal, padding_mask=key_padding_mask is not None, backward=False
            )
        else:
            backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            reasons = self.not_supported_reasons(
                device=q.device.type,
                dtype=q.dtype,
                causal=causal,
                padding_mask=key_padding_mask is not None,
                backward=backward,
                head_dim=q.shape[-1],
            )
        if reasons:
            raise ValueError(f"backend {self.name!r} cannot run this call: " + "; ".join(reasons))
        return resolved

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool,
        key_padding_mask: Tensor | None,
        scale: float,
    ) -> Tensor:
        """The computation, on inputs already checked by :meth:`__call__`."""
        raise NotImplementedError

    def decode_state(self, shape: StateShape) -> DecodeState:
        """An empty decoding state for sequences of ``shape`` (effattn.decoding.decode_state
        checks the arguments first). The default refuses with :attr:`decode_refusal`."""
        raise ValueError(f"backend {self.name!r} cannot decode with a state: {self.decode_refusal}")

    # -- declarations -----------------------------------------------------------------------
    def not_supported_reasons(
        self,
        *,
        device: str,
        dtype: torch.dtype,
        causal: bool = False,
        padding_mask: bool = False,
        backward: bool = False,
        head_dim: int | None = None,
    ) -> list[str]:
        """Why this backend cannot run such a call, in words a user understands; [] if it can."""
        reasons = []
        if device not in self.devices:
            reasons.append(f"device={device} (supported: {', '.join(self.devices)})")
        if dtype not in self.dtypes:
            names = ", ".join(dtype_name(d) for d in self.dtypes)
            reasons.append(f"dtype={dtype_name(dtype)} (supported: {names})")
        return reasons + self._mode_reasons(
            causal=causal, padding_mask=padding_mask, backward=backward
        )

    def _mode_reasons(self, *, causal: bool, padding_mask: bool, backward: bool) -> list[str]:
        """The refusals of the support flags, each with the backend's why_unsupported text."""
        refused = {
            "causal": causal and not self.supports_causal,
            "bidirectional": not causal and not self.supports_bidirectional,
            "padding_mask": padding_mask and not self.supports_padding_mask,
            "backward": backward and not self.supports_backward,
        }
        reasons = []
        for key, text in _REFUSALS.items():
            if refused[key]:
                why = self.why_unsupported.get(key)
                reasons.append(f"{text}: {why})" if why else f"{text})")
        return reasons

    def flops(
        self,
        batch: int,
        heads: int,
        q_len: int,
        kv_len: int,
        head_dim: int,
        *,
        causal: bool = False,
    ) -> int:
        """Forward FLOPs: 4*B*H*D per computed (query, key) pair. Dense by default (causal counts
        the pairs it keeps); sparse backends count only the pairs or blocks they compute."""
        return attention_flops(batch, heads, head_dim, pair_count(q_len, kv_len, causal=causal))

    def pattern(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
    ) -> Pattern:
        """The pairs this backend attends over for these inputs (dense: for tests and pictures).
        The default is the dense pattern: every pair allowed by causality and key padding.
        Backends without a pattern (``has_pattern = False``) raise NotImplementedError."""
        if not self.has_pattern:
            raise NotImplementedError(
                f"backend {self.name!r} does not attend over a subset of pairs: it has no "
                "pattern(); its dense form is attention_matrix()"
            )
        validate_qkv(q, k, v)
        validate_key_padding_mask(key_padding_mask, q, k)
        batch, _, q_len, _ = q.shape
        kv_len = k.shape[2]
        keep = keep_mask(
            batch, q_len, kv_len, causal=causal, key_padding_mask=key_padding_mask, device=q.device
        )
        if keep is None:
            keep = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=q.device)
        return Pattern(mask=keep.expand(keep.shape[0], 1, q_len, kv_len))

    # -- the dense reference ------------------------------------------------------------------
    def attention_matrix(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        scale: float | None = None,
    ) -> Tensor:
        """The dense matrix A (B, H, Nq, Nk), float64, with which this backend's output is
        ``A @ v``: its effective attention weights (tests, pictures and attention weights only;
        O(N^2) memory). Differentiable in q and k.

        The default is softmax attention restricted to :meth:`pattern` (probabilities; rows
        that keep no key are zero). Low-rank and kernel backends override it with their dense
        formula, built from the same random features, projections or landmarks as the fast
        path; their A need not be a probability matrix (Linformer's and Nystrom's have negative
        entries). q: (B, H, Nq, D), k, v: (B, H, Nk, D).
        """

        resolved = self._checked(q, k, v, causal, key_padding_mask, scale, dense=True)
        q64, k64 = q.double(), k.double()
        with torch.no_grad():  # the pattern of the inputs as given (LSH hashes them)
            pattern = self.pattern(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
        fields = {
            f.name: None if getattr(pattern, f.name) is None else getattr(pattern, f.name).double()
            for f in dataclasses.fields(Pattern)
            if f.name != "mask"
        }
        pattern = dataclasses.replace(pattern, **fields)
        return pattern_probabilities(q64, k64, pattern, resolved)

    def reference(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        scale: float | None = None,
    ) -> Tensor:
        """Dense float64 computation of exactly what :meth:`forward` computes: (B, H, Nq, D),
        ``attention_matrix(...) @ v``, differentiable in q, k and v. The fast path must equal
        it (tests/test_contract.py); every backend's output is linear in v through the matrix
        A of :meth:`attention_matrix`. q: (B, H, Nq, D), k, v: (B, H, Nk, D)."""
        weights = self.attention_matrix(
            q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale
        )
        return weights @ v.double()  # (B, H, Nq, Nk) @ (B, H, Nk, D) -> (B, H, Nq, D)

    # -- introspection ----------------------------------------------------------------------
    @classmethod
    def option_fields(cls) -> tuple[dataclasses.Field, ...]:
        """The backend's options: the dataclass fields, with their defaults."""
        return dataclasses.fields(cls)

    def options(self) -> dict[str, Any]:
        """This instance's option values."""
        return {f.name: getattr(self, f.name) for f in self.option_fields()}

    @classmethod
    def declaration(cls) -> dict[str, Any]:
        """What the backend declares, as one flat record (for `effattn list` and report tables)."""
        return {
            "backend": cls.name,
            "exact": cls.exact,
            "causal": cls.supports_causal,
            "bidirectional": cls.supports_bidirectional,
            "padding_mask": cls.supports_padding_mask,
            "backward": cls.supports_backward,
            "devices": ",".join(cls.devices),
            "dtypes": ",".join(dtype_name(d) for d in cls.dtypes),
            "complexity": cls.complexity,
            "memory": cls.memory_complexity,
            "class": cls.tay_class,
            "state": cls.state_complexity,
            "options": ", ".join(
                f"{f.name}={f.default!r}" if f.default is not dataclasses.MISSING else f.name
                for f in dataclasses.fields(cls)
            ),
            "description": cls.description,
        }
