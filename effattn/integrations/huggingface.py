"""effattn backends as HuggingFace transformers attention implementations.

>>> from transformers import AutoModelForCausalLM, LlamaConfig
>>> from effattn.integrations import huggingface
>>> huggingface.register()                       # effattn_full, effattn_sdpa, effattn_local, ...
>>> huggingface.register(name="effattn_local_128", backend="local", window=128)
>>> model = AutoModelForCausalLM.from_config(LlamaConfig(), attn_implementation="effattn_local")
>>> model.set_attn_implementation("effattn_full")   # or switch an existing model

Names: ``register()`` registers every effattn backend under ``effattn_<backend>`` with its
default options; ``register(name=..., backend=..., **options)`` registers one backend with
options. Each name goes to transformers' ``AttentionInterface`` (the attention call) and
``AttentionMaskInterface`` (the mask a model builds once per forward). Only models that
dispatch through AttentionInterface run them (``_supports_attention_backend``: Llama, Mistral,
Qwen, ESM, ...; BERT and RoBERTa from transformers 5, not in 4.57). Building a model that
computes attention in its own classes (BERT under 4.57) with an effattn name raises a
ValueError that says so and names the transformers version BERT needs (see
:func:`check_model_dispatches`), instead of transformers' bare ``KeyError``. Tested with
transformers 4.57 and 5.23.

How masks reach the backend. effattn backends take a ``causal`` flag and a (B, Nk) bool key
padding mask, never a dense (Nq, Nk) mask, so:

- the mask function registered for each name returns None (no padding) or the (B, Nk) bool key
  padding mask (True = the key takes part), like transformers' flash-attention masks. It first
  checks that the pattern the model asks for is plain causal, or every key for an encoder or a
  decoder's cross-attention (transformers 5.x builds their masks there too): a sliding window,
  chunked attention, packed sequences (``position_ids`` that restart) or an overlay that
  changes the first or last query's row is refused with a ValueError, never silently dropped.
  A causal pattern must put the last query at the last key's position (a dynamic cache; a
  static, pre-allocated one is refused); one that keeps every key needs no such alignment;
- causality then comes from the call's ``is_causal`` argument or the module's ``is_causal``
  attribute (True when absent, as transformers' SDPA path assumes), aligned bottom-right, so
  decoding with a KV cache (one query, all past keys) is right, and a cross-attention
  (``is_causal=False``: BART's, Marian's) attends to every unpadded encoder key;
- a 4-D mask, which models that build their own masks (ESM, BART and Marian under 4.57,
  user-given masks) hand over (bool, True = keep; or float, 0 = keep and a large negative =
  masked; shape (B or 1, 1, Nq or 1, >= Nk)), is read as the whole mask, as transformers' SDPA
  path does: it must be causal + key padding or key padding alone (where both fit, as with
  one query, the module's ``is_causal`` decides). Other masks (an additive bias such as T5's,
  per-head masks, a window) raise a ValueError. Rows that keep no key may be all-False or
  all-True in the given mask (transformers "unmasks" them); effattn gives them zeros either
  way. Reading a 4-D mask costs O(Nq * Nk), like the mask itself.

generate() with effattn's decoding states. transformers' own caches keep every key and value
and hand them all to each attention call, so an effattn backend recomputes over the whole
cache at every step. Passing :func:`decoding_cache` instead makes each decoder layer decode
with its backend's effattn state (effattn.decode_state: a K/V cache for full and sdpa, a ring
of the last ``window`` keys for local, running sums for linear and performer):

>>> model.set_attn_implementation("effattn_local_128")
>>> out = model.generate(ids, attention_mask=mask, max_new_tokens=64,
...                      past_key_values=huggingface.decoding_cache(model))

:class:`EffattnCache` (effattn.integrations.huggingface_cache) is that cache: a transformers
``Cache`` whose layer hands the attention call only the new keys and values, which the call
appends to the state. For an encoder-decoder, decoding_cache wraps it as
``EncoderDecoderCache(EffattnCache(model), DynamicCache())``: cross-attention keys and values
are the encoder's, computed once; their calls run through effattn, not causal, with the
encoder's key padding. A backend that cannot decode (decode_state refuses it: lsh, strided,
xl, ...) warns and keeps every key and value, recomputing over them as with transformers'
``DynamicCache``. Greedy search and sampling are supported; beam search, assisted decoding and
contrastive search (which edit the past) and ``output_attentions`` raise a ValueError with a
state. Without ``past_key_values`` generate() uses transformers' DynamicCache as usual.

Other arguments: keys and values with fewer heads than the queries (grouped-query attention)
go to the backend as they are (effattn backends take them; those without native support
repeat them to the query heads); ``scaling`` is the softmax scale; attention ``dropout`` > 0
(only passed when training) is not applied and warns (effattn backends have no attention
dropout); ``head_mask``, ``softcap`` and attention sinks (``s_aux``) raise. The output is in
the (B, Nq, H, D) layout transformers expects. Attention weights are None unless the call
carries ``output_attentions=True``; then they are the backend's own probabilities (B, H, Nq,
Nk), computed densely from its ``pattern()`` (see effattn.reference.pattern_probabilities).
Queries that keep no key (fully padded rows) give zeros, not NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from effattn._validate import resolve_scale
from effattn.backend import Backend
from effattn.integrations.hf_registry import LAYER_TAG, REGISTERED
from effattn.integrations.hf_registry import registered_backend as registered_backend  # public
from effattn.ops import keep_mask, repeat_kv_heads
from effattn.reference import pattern_probabilities
from effattn.registry import backend_class, get_backend, list_backends

PREFIX = "effattn_"  # register() names each backend effattn_<backend>

# Call arguments that some transformers models pass and effattn cannot honour.
_UNSUPPORTED_KWARGS = {
    "head_mask": "head_mask (multiplying attention probabilities per head)",
    "softcap": "softcap (tanh soft-capping of the scores)",
    "s_aux": "s_aux (attention sinks)",
}


# -- registration ----------------------------------------------------------------------------
def register(
    name: str | None = None,
    backend: str | Backend | None = None,
    *,
    device: str | None = None,
    **options: Any,
) -> list[str]:
    """Register effattn backends as transformers attention implementations; returns the names.

    Args:
        name: the ``attn_implementation`` name; ``effattn_<backend>`` when None.
        backend: a registered backend name or a Backend instance. None registers every effattn
            backend (``effattn.list_backends()`` at call time) that needs no options, with its
            defaults.
        device: with ``backend=None``, register only backends whose ``devices`` include it
            ("cpu", "cuda"); None registers all.
        **options: the backend's options (``window=128``); only with ``backend``.

    Registering a name again replaces what it ran. Names of transformers' own implementations
    ("sdpa", "eager", "flash_attention_2", ...) are refused.
    """
    _require_transformers()
    if backend is None:
        if name is not None or options:
            raise ValueError(
                "register: name and options need a backend, e.g. "
                "register(name='effattn_local_128', backend='local', window=128); "
                f"got name={name!r}, options={sorted(options)} and no backend"
            )
        entries = [
            (PREFIX + b, get_backend(b))
            for b in list_backends()
            if _needs_no_options(b) and (device is None or device in backend_class(b).devices)
        ]
    else:
        instance = get_backend(backend, **options)
        entries = [(PREFIX + instance.name if name is None else name, instance)]
    for entry_name, instance in entries:
        _register_one(entry_name, instance)
    return [entry_name for entry_name, _ in entries]


def decoding_cache(model: Any) -> Any:
    """A cache for ``model.generate(past_key_values=...)`` that decodes with effattn states:
    :class:`EffattnCache` for a decoder-only model; for an encoder-decoder,
    ``EncoderDecoderCache(EffattnCache(model), DynamicCache())`` (the encoder's keys and values
    for cross-attention are computed once and kept whole, as transformers does). The model must
    run an effattn attention implementation (see the module docstring). One cache per
    generate() call."""
    _require_transformers()
    from transformers import DynamicCache, EncoderDecoderCache

    from effattn.integrations.huggingface_cache import EffattnCache

    cache = EffattnCache(model)
    if getattr(model.config, "is_encoder_decoder", False):
        return EncoderDecoderCache(cache, DynamicCache())
    return cache


def __getattr__(name: str) -> Any:
    """``EffattnCache`` is imported on first use: it needs transformers."""
    if name == "EffattnCache":
        _require_transformers()
        from effattn.integrations.huggingface_cache import EffattnCache

        return EffattnCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "effattn.integrations.huggingface needs transformers: pip install 'effattn[hf]'"
        ) from err


def _needs_no_options(backend: str) -> bool:
    """True if the backend can be built with its defaults (every option has a default)."""
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in backend_class(backend).option_fields()
    )


def _register_one(name: str, backend: Backend) -> None:
    from transformers import AttentionInterface

    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty str, got {name!r}")
    taken = (set(AttentionInterface._global_mapping) - set(REGISTERED)) | {"eager"}
    if name in taken:
        raise ValueError(
            f"name: expected a name that transformers does not use itself, got {name!r} "
            f"(use e.g. {PREFIX}{backend.name!r})"
        )
    _install_dispatch_check()
    AttentionInterface.register(name, _attention_function(backend))
    try:
        from transformers import AttentionMaskInterface
    except ImportError:  # transformers < 4.53: models hand over 4-D masks, read by the call
        pass
    else:
        AttentionMaskInterface.register(name, key_padding_mask_interface)
    REGISTERED[name] = backend


def _install_dispatch_check() -> None:
    """Wrap ``PreTrainedModel.get_correct_attn_implementation`` (which every model runs on its
    attention implementation when it is built, or switched) once, so that an effattn name is
    checked with :func:`check_model_dispatches` first. Other names pass untouched."""
    from transformers import PreTrainedModel

    current = getattr(PreTrainedModel, "get_correct_attn_implementation", None)
    if current is None or getattr(current, "_effattn_checks_dispatch", False):
        return

    @functools.wraps(current)
    def get_correct_attn_implementation(self, requested_attention, *args, **kwargs):
        if requested_attention in REGISTERED:
            check_model_dispatches(type(self), requested_attention)
        return current(self, requested_attention, *args, **kwargs)

    get_correct_attn_implementation._effattn_checks_dispatch = True
    PreTrainedModel.get_correct_attn_implementation = get_correct_attn_implementation


def check_model_dispatches(model_class: type, name: str) -> None:
    """Raise a ValueError if ``model_class`` (a transformers PreTrainedModel) computes attention
    in its own classes rather than through ``AttentionInterface``, so that the effattn name
    ``name`` could never run in it (transformers 4.57's BERT, RoBERTa and other encoders fail
    with a bare ``KeyError`` then, or ignore the name).

    Known to dispatch: ``_supports_attention_backend``, or a module whose source uses
    ``ALL_ATTENTION_FUNCTIONS``. Known not to: a module that defines ``class ...Attention(
    nn.Module)`` and never uses it. Anything else (no source, attention defined elsewhere) is
    left to transformers."""
    if getattr(model_class, "_supports_attention_backend", False):
        return
    try:
        source = inspect.getsource(sys.modules[model_class.__module__])
    except (KeyError, OSError, TypeError):
        return
    if "ALL_ATTENTION_FUNCTIONS" in source:
        return
    if not re.search(r"class \w+Attention\(nn\.Module\)", source):
        return
    import transformers

    raise ValueError(
        f"attn_implementation: {model_class.__name__} in transformers {transformers.__version__} "
        f"computes attention in its own classes instead of dispatching through transformers' "
        f"AttentionInterface, so it cannot run {name!r} (or any effattn backend); BERT, RoBERTa "
        "and other BERT-style encoders dispatch through it from transformers 5.0 on: "
        "pip install 'transformers>=5' (the 'effattn[fidelity]' extra does). Models that "
        "dispatch already (Llama, Mistral, Qwen, ESM, ...) run effattn backends under "
        f"{transformers.__version__} too."
    )


def _attention_function(backend: Backend) -> Callable[..., tuple[Tensor, Tensor | None]]:
    def effattn_attention(
        module: torch.nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        return attention_forward(module, query, key, value, attention_mask, backend, **kwargs)

    effattn_attention.__qualname__ = effattn_attention.__name__ = f"effattn_{backend.name}"
    return effattn_attention


# -- the attention call ----------------------------------------------------------------------
def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    backend: Backend,
    *,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """transformers' attention call, computed by ``backend``.

    Args:
        module: the calling attention layer (its ``is_causal`` is read when no mask says).
        query: (B, H, Nq, D). key, value: (B, Hkv, Nk, D) with H a multiple of Hkv, passed to
            the backend as they are (grouped-query attention); from an :class:`EffattnCache`
            layer that decodes, only the Nq new keys and values (B, Hkv, Nq, D).
        attention_mask: None, the (B, Nk) bool key padding mask made by
            :func:`key_padding_mask_interface`, or a 4-D mask (see the module docstring); Nk
            counts every cached key, also when only the new ones are passed.
        backend: the effattn backend.
        dropout: attention dropout probability; not applied (warns when > 0).
        scaling: softmax scale; 1/sqrt(D) when None.
        is_causal: overrides ``module.is_causal`` when given.

    Returns:
        (attn_output (B, Nq, H, D), attn_weights (B, H, Nq, Nk) or None).
    """
    layer = _decoding_layer(key)
    kv_len = key.shape[2] if layer is None else layer.seen
    _refuse_unsupported(kwargs, kv_len)
    if dropout > 0:
        warnings.warn(
            f"effattn backend {backend.name!r}: attention dropout={dropout} is not applied "
            "(effattn backends have no attention dropout); set the model's attention dropout to "
            "0 to silence this",
            stacklevel=2,
        )
    batch, _, q_len, _ = query.shape
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    if attention_mask is not None and attention_mask.dim() == 4:
        causal, padding = causal_and_padding_from_4d(attention_mask, q_len, kv_len, prefer=causal)
    else:
        padding = _padding_from_2d(attention_mask, batch, kv_len)
    if layer is not None:
        out = _decode(layer, query, key, value, causal, padding, scaling, kwargs)
    else:
        out = backend(query, key, value, causal=causal, key_padding_mask=padding, scale=scaling)
    weights = None
    if kwargs.get("output_attentions", False):
        weights = attention_weights(backend, query, key, value, causal, padding, scaling)
    return out.transpose(1, 2).contiguous(), weights  # (B, H, Nq, D) -> (B, Nq, H, D)


def _decoding_layer(key: Tensor) -> Any:
    """The EffattnCache layer that tagged ``key`` in its update (the tag is removed), or None."""
    layer = getattr(key, LAYER_TAG, None)
    if layer is not None:
        delattr(key, LAYER_TAG)
    return layer


def _decode(
    layer: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    causal: bool,
    padding: Tensor | None,
    scaling: float | None,
    kwargs: dict[str, Any],
) -> Tensor:
    """The new queries' outputs (B, H, Nq, D) from the layer's decoding state; padding: the
    (B, Nk) key padding of every position, of which the state takes the new keys'."""
    if not causal:
        raise ValueError(
            "is_causal: an EffattnCache layer decodes causal self-attention, got a call that is "
            "not causal (a cross-attention belongs in EncoderDecoderCache's cross-attention "
            "cache: see effattn.integrations.huggingface.decoding_cache)"
        )
    if kwargs.get("output_attentions", False):
        raise ValueError(
            "output_attentions: an effattn decoding state keeps no full key matrix to weigh; "
            "generate with transformers' DynamicCache for attention weights"
        )
    new = None if padding is None else padding[:, -key.shape[2] :]  # (B, Nk) -> (B, Nq)
    return layer.attend(query, key, value, new, scaling)


def attention_weights(
    backend: Backend,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    causal: bool,
    padding: Tensor | None,
    scaling: float | None,
) -> Tensor:
    """The backend's own probabilities (B, H, Nq, Nk), computed densely from its ``pattern()``;
    query: (B, H, Nq, D), key, value: (B, Hkv, Nk, D), repeated to the H query heads here."""
    heads = query.shape[1]
    key, value = repeat_kv_heads(key, heads), repeat_kv_heads(value, heads)
    pattern = backend.pattern(query, key, value, causal=causal, key_padding_mask=padding)
    scale = resolve_scale(scaling, query.shape[-1])
    return pattern_probabilities(query, key, pattern, scale).to(query.dtype)


def _refuse_unsupported(kwargs: dict[str, Any], kv_len: int) -> None:
    for arg, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(arg) is not None:
            raise ValueError(f"{arg}: effattn backends do not support {what}; got one")
    window = kwargs.get("sliding_window")
    if window is not None and window < kv_len:
        raise ValueError(
            f"sliding_window: effattn's transformers integration passes causality and key "
            f"padding only, got a sliding window of {window} over {kv_len} keys; build the model "
            "with sliding_window=None (an effattn windowed backend such as 'local' has its own "
            "window option)"
        )


def _padding_from_2d(mask: Tensor | None, batch: int, kv_len: int) -> Tensor | None:
    """A (B, Nk) key padding mask (bool or 0/1, True = keep) -> bool, or None if it keeps all."""
    if mask is None:
        return None
    if mask.dim() != 2 or tuple(mask.shape) != (batch, kv_len):
        raise ValueError(
            f"attention_mask: expected None, a (B, Nk) = {(batch, kv_len)} key padding mask or a "
            f"4-D mask, got shape {tuple(mask.shape)}"
        )
    keep = mask if mask.dtype == torch.bool else mask != 0
    return None if bool(keep.all()) else keep


def causal_and_padding_from_4d(
    mask: Tensor, q_len: int, kv_len: int, *, prefer: bool = True
) -> tuple[bool, Tensor | None]:
    """Read a transformers 4-D mask as (causal, key padding mask (B, Nk) bool or None).

    mask: (B or 1, 1 or H, Nq or 1, >= Nk), bool (True = keep) or float (0 = keep, at most
    finfo.min / 2 or -inf = masked); only its first Nk keys count, as in transformers' SDPA path.
    The last query's row keeps exactly the unpadded keys under bottom-right causality, so it is
    the candidate padding; the mask must equal causal & padding, or padding alone, except on rows
    that keep no key (which may be all-True). Anything else raises a ValueError. Where both
    readings fit (one query: causal and not are the same), ``prefer`` (the layer's is_causal)
    decides, so that a cross-attention call stays non-causal.
    """
    if mask.shape[-1] < kv_len or mask.shape[-2] not in (1, q_len):
        raise ValueError(
            f"attention_mask: expected a 4-D mask of shape (B, 1, {q_len} or 1, >= {kv_len}), "
            f"got {tuple(mask.shape)}"
        )
    keep = _keep_from_4d(mask[..., :kv_len])  # (B, 1, Nq or 1, Nk)
    batch = keep.shape[0]
    padding = keep[:, 0, -1, :]  # (B, 1, Nq, Nk) -> (B, Nk): the last query's row
    padding_or_none = None if bool(padding.all()) else padding
    if keep.shape[2] == 1:  # one row for every query: padding alone
        return prefer and q_len == 1, padding_or_none
    rows = keep[:, 0]  # (B, 1, Nq, Nk) -> (B, Nq, Nk)
    for causal in (prefer, not prefer):
        expected = keep_mask(
            batch, q_len, kv_len, causal=causal, key_padding_mask=padding, device=mask.device
        )[:, 0].expand_as(rows)  # (B, 1, Nq or 1, Nk) -> (B, Nq, Nk)
        empty = ~expected.any(dim=-1, keepdim=True)  # (B, Nq, 1): rows that keep no key
        if bool(((rows == expected) | (empty & rows.all(dim=-1, keepdim=True))).all()):
            return causal, padding_or_none
    raise ValueError(
        "attention_mask: effattn backends take causality and key padding only, got a 4-D mask "
        "that is neither causal + padding nor padding alone (a window, packed sequences or a "
        "custom pattern); use one of transformers' own attention implementations for it"
    )


def _keep_from_4d(mask: Tensor) -> Tensor:
    """A 4-D mask (bool True = keep, or additive float 0 / very negative) -> (B, 1, Nq', Nk)."""
    if mask.dtype == torch.bool:
        keep = mask
    elif mask.is_floating_point():
        keep = mask == 0
        blocked = mask <= torch.finfo(mask.dtype).min / 2
        if not bool((keep | blocked).all()):
            raise ValueError(
                "attention_mask: expected an additive mask of 0 (keep) and large negative values "
                "(masked), got other values (an additive bias such as ALiBi, which effattn "
                "backends do not take)"
            )
    else:
        raise TypeError(f"attention_mask: expected a bool or floating mask, got {mask.dtype}")
    if keep.shape[1] != 1:
        if not bool((keep == keep[:, :1]).all()):
            raise ValueError(
                f"attention_mask: expected one mask for all heads (dim 1 of size 1), got "
                f"{keep.shape[1]} different per-head masks"
            )
        keep = keep[:, :1]  # (B, H, Nq, Nk) -> (B, 1, Nq, Nk)
    return keep


# -- the mask function (AttentionMaskInterface) -----------------------------------------------
def key_padding_mask_interface(
    batch_size: int,
    cache_position: Tensor | None = None,
    kv_length: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: Tensor | None = None,
    *,
    q_length: int | None = None,
    q_offset: int = 0,
    **kwargs: Any,
) -> Tensor | None:
    """transformers' mask hook for effattn: None, or the (B, Nk) bool key padding mask.

    Args (as transformers' mask interface passes them; 4.x gives the queries' positions as
    ``cache_position``, 5.x as ``q_length`` and ``q_offset``):
        batch_size: B.
        cache_position: (Nq,) absolute positions of the queries (transformers 4.x).
        kv_length: Nk, the number of keys the attention call will see.
        kv_offset: absolute position of the first of them.
        mask_function: the model's pattern predicate (causal, or causal with a window, chunks,
            packed sequences, overlays; bidirectional for encoders and cross-attention in 5.x);
            it must equal plain causal or keep every key on the first and last query's rows
            (checked in O(B * Nk)), else a ValueError names what to change. Unless it keeps
            every key, the last query must sit at the last key's position (a dynamic cache).
        attention_mask: None or the (B, >= kv_offset + Nk) bool padding mask (True = keep).
        q_length, q_offset: Nq and the absolute position of the first query (transformers 5.x).
    """
    if cache_position is not None:
        q_len, first = cache_position.shape[0], int(cache_position[0])
        last = int(cache_position[-1])
    elif q_length is not None:
        q_len, first, last = q_length, q_offset, q_offset + q_length - 1
    else:
        raise ValueError(
            "key_padding_mask_interface: expected cache_position or q_length, got neither"
        )
    device = attention_mask.device if attention_mask is not None else kwargs.get("device", "cpu")
    every_key = False
    if mask_function is not None:
        every_key = _check_plain_pattern(
            mask_function, batch_size, (first, last), kv_length, kv_offset, device
        )
    aligned = last - kv_offset == kv_length - 1 and last - first == q_len - 1
    if not (aligned or every_key):
        raise ValueError(
            "cache_position: effattn backends align the last query with the last key, got "
            f"queries at positions {first}..{last} over {kv_length} keys from position "
            f"{kv_offset} (a static or pre-allocated cache); use the default dynamic cache"
        )
    if attention_mask is None:
        return None
    padding = _keys_of(attention_mask, kv_length, kv_offset)  # (B, Nk)
    return None if bool(padding.all()) else padding


def _keys_of(attention_mask: Tensor, kv_length: int, kv_offset: int) -> Tensor:
    """The (B, Nk) bool padding of the keys at kv_offset .. kv_offset + Nk - 1 from the model's
    (B, L) mask, positions past L counting as padding (as transformers pads it)."""
    keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    missing = kv_offset + kv_length - keep.shape[-1]
    if missing > 0:
        keep = torch.nn.functional.pad(keep, (0, missing))  # (B, L) -> (B, kv_offset + Nk)
    return keep[:, kv_offset : kv_offset + kv_length]


def _check_plain_pattern(
    mask_function: Callable,
    batch_size: int,
    rows: tuple[int, int],
    kv_length: int,
    kv_offset: int,
    device: torch.device | str,
) -> bool:
    """Raise unless ``mask_function`` keeps exactly the causal keys, or every key (an encoder's
    or a cross-attention's bidirectional mask, transformers 5.x), on the rows of the first and
    last query (absolute positions ``rows``); returns True for every key. A sliding window,
    chunks or packed sequences all drop keys from the last row. Evaluates the predicate on
    those rows only: O(B * Nk). Causal or not, the call itself then follows the layer's
    ``is_causal``."""
    kv_idx = torch.arange(kv_offset, kv_offset + kv_length, device=device)  # (Nk,)
    kv_idx = kv_idx.expand(batch_size, -1)  # (Nk,) -> (B, Nk)
    batch_idx = torch.arange(batch_size, device=device)[:, None].expand_as(kv_idx)  # (B, Nk)
    got = [
        mask_function(batch_idx, torch.zeros_like(kv_idx), torch.full_like(kv_idx, row), kv_idx)
        for row in rows
    ]  # (B, Nk) bool per row
    every_key = all(bool(keep.all()) for keep in got)
    causal = all(bool((keep == (kv_idx <= row)).all()) for keep, row in zip(got, rows, strict=True))
    if not (causal or every_key):
        raise ValueError(
            "attention_mask: effattn backends take causality and key padding only, but the "
            "model asks for another pattern (a sliding window, chunked attention, packed "
            "sequences from position_ids that restart, or an overlay); put one sequence per "
            "batch row (padding via attention_mask) and set the model's sliding_window / "
            "attention_chunk_size to None"
        )
    return every_key
