"""effattn backends inside transformers models (effattn.integrations.huggingface).

Models are built from tiny configs with random weights (no downloads). A model is run with
transformers' own ``sdpa`` first, then switched with ``set_attn_implementation`` to an effattn
name, so both runs share the weights.
"""

from __future__ import annotations

import sys
import warnings
from unittest import mock

import pytest
import torch

import effattn
from effattn.integrations import huggingface as hf

transformers = pytest.importorskip(
    "transformers", reason="transformers is an optional extra: pip install 'effattn[hf]'"
)
from transformers import EsmConfig, EsmForMaskedLM, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.masking_utils import sliding_window_causal_mask_function  # noqa: E402

N = 20  # sequence length of every model test
ATOL = 2e-5  # float32 logits of the same model under two exact attention implementations

# Every other registered CPU backend that can train (sparse ones, Triton under its interpreter)
# runs inside a model; the exact baselines full and sdpa are covered by the logits tests.
OTHER_BACKENDS = [
    name
    for name in effattn.list_backends()
    if name not in ("full", "sdpa")
    and "cpu" in effattn.backend_class(name).devices
    and effattn.backend_class(name).supports_backward
    and hf._needs_no_options(name)
]


def _skip_unless_it_runs_here(name: str) -> None:
    """Skip with the backend's own reasons when it cannot run the tests' calls (CPU, float32,
    causal where it can be) here: ``triton`` without triton installed or TRITON_INTERPRET."""
    backend = effattn.get_backend(name)
    reasons = backend.not_supported_reasons(
        device="cpu", dtype=torch.float32, causal=backend.supports_causal
    )
    if reasons:
        pytest.skip("; ".join(reasons))


@pytest.fixture(scope="module", autouse=True)
def _registered():
    hf.register()


def _llama(**overrides) -> LlamaForCausalLM:
    """A 2-layer Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4 * N,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


def _esm() -> EsmForMaskedLM:
    """A 2-layer ESM encoder: BERT's architecture, bidirectional, dispatching through
    transformers' AttentionInterface with a 4-D padding mask."""
    config = EsmConfig(
        vocab_size=33,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        pad_token_id=1,
        mask_token_id=32,
        max_position_embeddings=4 * N,
        position_embedding_type="rotary",
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
    )
    return EsmForMaskedLM(config).eval()


def _padding(kind: str, batch: int = 3) -> torch.Tensor | None:
    """A (B, N) attention_mask (1 = token, 0 = padding), or None."""
    if kind == "none":
        return None
    mask = torch.ones(batch, N, dtype=torch.long)
    if kind == "right":
        mask[1, 13:] = 0
        mask[2, 3:] = 0
    elif kind == "left":
        mask[1, :7] = 0
        mask[2, : N - 2] = 0
    return mask


def _logits(model, implementation: str, ids, attention_mask, **kwargs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(ids, attention_mask=attention_mask, **kwargs).logits


def _assert_close_on_tokens(got, want, attention_mask):
    """Compare logits at real tokens; padded positions of effattn must be finite."""
    assert torch.isfinite(got).all(), "effattn logits have NaN or inf"
    keep = torch.ones(got.shape[:2], dtype=torch.bool) if attention_mask is None else attention_mask
    torch.testing.assert_close(got[keep.bool()], want[keep.bool()], atol=ATOL, rtol=1e-4)


# -- registration ----------------------------------------------------------------------------
def test_register_names_every_backend():
    from transformers import AttentionInterface, AttentionMaskInterface

    names = hf.register()
    assert "effattn_full" in names and "effattn_sdpa" in names
    for backend in effattn.list_backends():
        if hf._needs_no_options(backend):
            assert f"effattn_{backend}" in names
    for name in names:
        assert name in AttentionInterface._global_mapping
        assert AttentionMaskInterface._global_mapping[name] is hf.key_padding_mask_interface
        assert hf.registered_backend(name).name == name.removeprefix("effattn_")


def test_register_one_backend_with_options():
    backend = effattn.get_backend("full")
    assert hf.register(name="effattn_mine", backend=backend) == ["effattn_mine"]
    assert hf.registered_backend("effattn_mine") is backend
    assert hf.register(backend="sdpa", device="cpu") == ["effattn_sdpa"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": "effattn_x", "window": 3}, ValueError, "need a backend"),
        ({"backend": "full", "window": 3}, ValueError, "unknown option"),
        ({"backend": "no_such_backend"}, ValueError, "unknown backend"),
        ({"name": "sdpa", "backend": "full"}, ValueError, "transformers does not use"),
        ({"name": "eager", "backend": "full"}, ValueError, "transformers does not use"),
    ],
)
def test_register_refuses_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        hf.register(**kwargs)


def test_register_without_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    with pytest.raises(ImportError, match=r"pip install 'effattn\[hf\]'"):
        hf.register()


def test_registered_backend_names_the_known_ones():
    with pytest.raises(ValueError, match="effattn_full"):
        hf.registered_backend("nope")


# -- a causal decoder (Llama, grouped-query attention) ----------------------------------------
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_llama_logits_match_sdpa(padding: str):
    model = _llama()
    ids = torch.randint(0, 64, (3, N))
    mask = _padding(padding)
    want = _logits(model, "sdpa", ids, mask)
    got = _logits(model, "effattn_full", ids, mask)
    _assert_close_on_tokens(got, want, mask)


def test_llama_decoding_with_a_cache_matches_sdpa():
    model = _llama()
    ids = torch.randint(0, 64, (3, N + 1))
    mask = _padding("left")
    step_mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
    results = {}
    for implementation in ("sdpa", "effattn_full"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            prefill = model(ids[:, :N], attention_mask=mask, use_cache=True)
            step = model(
                ids[:, N:],
                attention_mask=step_mask,
                past_key_values=prefill.past_key_values,
                use_cache=True,
            )
        results[implementation] = step.logits
    torch.testing.assert_close(results["effattn_full"], results["sdpa"], atol=ATOL, rtol=1e-4)


def test_llama_passes_causal_flag_and_key_padding_to_the_backend():
    model = _llama()
    ids = torch.randint(0, 64, (3, N))
    mask = _padding("left")
    backend = hf.registered_backend("effattn_full")
    with mock.patch.object(
        type(backend), "forward", autospec=True, side_effect=type(backend).forward
    ) as spy:
        _logits(model, "effattn_full", ids, mask)
    assert spy.call_count == model.config.num_hidden_layers
    for call in spy.call_args_list:
        _, q, k, _ = call.args
        assert call.kwargs["causal"] is True
        assert q.shape == (3, 4, N, 8)
        assert k.shape == (3, 2, N, 8)  # GQA: the 2 key/value heads reach the backend as they are
        torch.testing.assert_close(call.kwargs["key_padding_mask"], mask.bool())


def test_fully_padded_rows_give_finite_outputs_and_gradients():
    model = _llama()
    model.set_attn_implementation("effattn_full")
    ids = torch.randint(0, 64, (2, N))
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1] = 0  # a batch row with no token at all
    logits = model(ids, attention_mask=mask).logits
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_attention_weights_match_eager_when_requested():
    model = _llama()
    ids = torch.randint(0, 64, (3, N))
    mask = _padding("right")
    outputs = {}
    for implementation in ("eager", "effattn_full"):
        model.set_attn_implementation(implementation)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers warns output_attentions is eager-only
            outputs[implementation] = model(ids, attention_mask=mask, output_attentions=True)
    keep = mask.bool()[:, None, :, None]  # (B, 1, Nq, 1): rows of real query tokens
    pairs = zip(outputs["effattn_full"].attentions, outputs["eager"].attentions, strict=True)
    for got, want in pairs:
        assert got.shape == want.shape == (3, 4, N, N)
        torch.testing.assert_close(got * keep, want * keep, atol=1e-6, rtol=1e-5)


def test_attention_dropout_in_training_warns():
    model = _llama(attention_dropout=0.1).train()
    model.set_attn_implementation("effattn_full")
    with pytest.warns(UserWarning, match="dropout=0.1 is not applied"):
        model(torch.randint(0, 64, (1, N)))


def test_sliding_window_model_is_refused():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
    )
    model = MistralForCausalLM(config)
    model.set_attn_implementation("effattn_full")
    with pytest.raises(ValueError, match="sliding"):
        model(torch.randint(0, 64, (1, N)))


def test_packed_sequences_are_refused():
    model = _llama()
    model.set_attn_implementation("effattn_full")
    position_ids = torch.cat([torch.arange(12), torch.arange(N - 12)])[None]  # two sequences
    with pytest.raises(ValueError, match="packed"):
        model(torch.randint(0, 64, (1, N)), position_ids=position_ids, use_cache=False)


def test_mask_function_refuses_a_window_and_returns_padding():
    positions = torch.arange(N)
    with pytest.raises(ValueError, match="sliding window"):
        hf.key_padding_mask_interface(1, positions, N, 0, sliding_window_causal_mask_function(4))
    mask = torch.ones(2, N, dtype=torch.bool)
    assert hf.key_padding_mask_interface(2, positions, N, attention_mask=mask) is None
    mask[0, :3] = False
    torch.testing.assert_close(
        hf.key_padding_mask_interface(2, positions, N, attention_mask=mask), mask
    )


# -- a bidirectional encoder with padding -------------------------------------------------------
@pytest.mark.parametrize("padding", ["none", "right"])
def test_esm_encoder_logits_match_sdpa(padding: str):
    model = _esm()
    mask = _padding(padding)
    ids = torch.randint(4, 30, (3, N))
    if mask is not None:
        ids[mask == 0] = model.config.pad_token_id
    want = _logits(model, "sdpa", ids, mask)
    got = _logits(model, "effattn_full", ids, mask)
    _assert_close_on_tokens(got, want, mask)


def test_bert_encoder_logits_match_sdpa():
    from transformers import BertConfig, BertForMaskedLM

    if not BertForMaskedLM._supports_attention_backend:
        pytest.skip(
            f"BERT in transformers {transformers.__version__} has its own attention classes and "
            "does not dispatch through AttentionInterface (the ESM test covers a BERT-style "
            "encoder)"
        )
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
    )
    model = BertForMaskedLM(config).eval()
    mask = _padding("right")
    ids = torch.randint(0, 64, (3, N))
    want = _logits(model, "sdpa", ids, mask)
    got = _logits(model, "effattn_full", ids, mask)
    _assert_close_on_tokens(got, want, mask)


def _tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
    )


def test_bert_with_an_effattn_name_runs_or_names_the_transformers_it_needs():
    """transformers 4.57's BERT has its own attention classes: building it with an effattn name
    is refused with the version BERT needs (it was a bare KeyError inside transformers); from
    5.x on it dispatches through AttentionInterface and the backend really runs."""
    from transformers import AutoModel, BertModel

    config = _tiny_bert_config()
    if not BertModel._supports_attention_backend:
        with pytest.raises(ValueError, match=r"BertModel in transformers .*transformers>=5"):
            AutoModel.from_config(config, attn_implementation="effattn_local")
        return
    model = AutoModel.from_config(config, attn_implementation="effattn_local").eval()
    assert model.config._attn_implementation == "effattn_local"
    backend = hf.registered_backend("effattn_local")
    with mock.patch.object(
        type(backend), "forward", autospec=True, side_effect=type(backend).forward
    ) as spy:
        model(torch.randint(0, 64, (1, N)))
    assert spy.call_count == config.num_hidden_layers


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_dispatch_check_leaves_transformers_own_implementations_alone(implementation: str):
    from transformers import AutoModel

    model = AutoModel.from_config(_tiny_bert_config(), attn_implementation=implementation)
    assert model.config._attn_implementation == implementation


# -- reading 4-D masks ----------------------------------------------------------------------------
def _additive(keep: torch.Tensor) -> torch.Tensor:
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


def test_4d_causal_and_padding_mask_is_read():
    padding = torch.ones(2, 6, dtype=torch.bool)
    padding[1, :2] = False  # left padding
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    keep = causal[None, None] & padding[:, None, None, :]  # (B, 1, Nq, Nk)
    keep[1, 0, :2] = True  # transformers "unmasks" rows that keep no key
    for mask in (keep, _additive(keep)):
        is_causal, got = hf.causal_and_padding_from_4d(mask, 6, 6)
        assert is_causal is True
        torch.testing.assert_close(got, padding)


def test_4d_padding_mask_is_read():
    padding = torch.ones(2, 6, dtype=torch.bool)
    padding[0, 4:] = False
    is_causal, got = hf.causal_and_padding_from_4d(_additive(padding[:, None, None, :]), 6, 6)
    assert is_causal is False
    torch.testing.assert_close(got, padding)
    square = padding[:, None, None, :].expand(2, 1, 6, 6)  # (B, 1, Nk) rows repeated Nq times
    is_causal, got = hf.causal_and_padding_from_4d(square, 6, 6)
    assert is_causal is False
    torch.testing.assert_close(got, padding)


def test_4d_mask_keeping_everything_is_no_mask():
    is_causal, got = hf.causal_and_padding_from_4d(torch.zeros(2, 1, 6, 6), 6, 6)
    assert is_causal is False and got is None


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (torch.ones(6, 6, dtype=torch.bool).tril().triu(-1)[None, None], "neither causal"),
        (torch.full((1, 1, 6, 6), -1.5), "additive bias"),
        (torch.ones(1, 1, 5, 6, dtype=torch.bool), "4-D mask of shape"),
        (torch.stack([torch.ones(6, 6), torch.eye(6)]).bool()[None], "per-head"),
    ],
)
def test_4d_masks_effattn_cannot_take_are_refused(mask, match):
    with pytest.raises(ValueError, match=match):
        hf.causal_and_padding_from_4d(mask, 6, 6)


# -- sparse backends inside a model: forward, backward, and the backend is really called ---------
def _train_step_calls(model, implementation: str, mask) -> int:
    """Forward + backward with ``implementation``; returns how often its backend ran."""
    backend = hf.registered_backend(implementation)
    model.set_attn_implementation(implementation)
    model.train()
    ids = torch.randint(4, 30, (3, N))
    with mock.patch.object(
        type(backend), "forward", autospec=True, side_effect=type(backend).forward
    ) as spy:
        out = model(ids, attention_mask=mask, labels=ids, use_cache=False)
        out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    return spy.call_count


def test_spied_backend_runs_forward_and_backward():
    model = _llama()
    assert _train_step_calls(model, "effattn_full", _padding("left")) == 2


@pytest.mark.parametrize("name", OTHER_BACKENDS)
def test_every_other_backend_trains_inside_a_model(name: str):
    _skip_unless_it_runs_here(name)
    cls = effattn.backend_class(name)
    model = _llama() if cls.supports_causal else _esm()
    mask = _padding("right") if cls.supports_padding_mask else None
    assert _train_step_calls(model, f"effattn_{name}", mask) == 2


def test_local_backend_with_a_window_changes_the_logits():
    if "local" not in effattn.list_backends():
        pytest.skip("the 'local' backend is not registered yet")
    hf.register(name="effattn_local_w3", backend="local", window=3)
    model = _llama()
    assert _train_step_calls(model, "effattn_local_w3", _padding("left")) == 2
    ids = torch.randint(0, 64, (1, N))
    full, local = (_logits(model, impl, ids, None) for impl in ("effattn_full", "effattn_local_w3"))
    assert not torch.allclose(full[:, 8:], local[:, 8:])  # queries past the window differ


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", OTHER_BACKENDS)
def test_every_other_backend_takes_the_transformers_layout(name: str, batch: int):
    """transformers hands over q, k, v as (B, N, H, D) views transposed to (B, H, N, D), which
    are not contiguous; N = 256 is past several blocks or buckets of the sparse backends."""
    _skip_unless_it_runs_here(name)
    cls = effattn.backend_class(name)
    module = torch.nn.Module()
    module.is_causal = cls.supports_causal
    n = 256
    q, k, v = (torch.randn(batch, n, 4, 8).transpose(1, 2) for _ in range(3))  # (B, H, N, D)
    out, weights = hf.attention_forward(
        module, q, k, v, None, hf.registered_backend(f"effattn_{name}")
    )
    assert out.shape == (batch, n, 4, 8) and weights is None
    assert torch.isfinite(out).all()
