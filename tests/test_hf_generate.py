"""generate() with effattn attention implementations (effattn.integrations.huggingface).

Tiny models with random weights (no downloads). The reference for each backend is the same
model generating with ``use_cache=False``: the backend's causal forward over the whole sequence
at every step. With :func:`huggingface.decoding_cache` every layer decodes with the backend's
effattn state; greedy tokens must be equal and the per-step logits close.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import effattn
from effattn.decoding import DecodeState
from effattn.integrations import huggingface as hf

transformers = pytest.importorskip(
    "transformers", reason="transformers is an optional extra: pip install 'effattn[hf]'"
)
from transformers import (  # noqa: E402
    BartConfig,
    BartForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    MarianConfig,
    MarianMTModel,
)

PROMPT = 10  # decoder-only prompt length
NEW = 8  # tokens generated per test
SOURCE = 200  # encoder-decoder input length (as in issue #31)
ATOL = 1e-4  # float32 logits, cached state vs recomputed causal forward

# effattn names whose backends decode with a state; local_w4's window (4) is shorter than the
# sequences, so its ring drops keys. The encoder-decoder tests use local's default window (256),
# which covers the 200 encoder keys: a window also applies to cross-attention, aligned
# bottom-right, so a shorter one attends to other encoder keys without a cache than with one.
DECODER_ONLY = ["effattn_full", "effattn_sdpa", "effattn_local_w4", "effattn_linear",
                "effattn_performer"]  # fmt: skip
ENCODER_DECODER = ["effattn_full", "effattn_sdpa", "effattn_local", "effattn_linear",
                   "effattn_performer"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _registered():
    hf.register()
    hf.register(name="effattn_local_w4", backend="local", window=4)


def _llama() -> LlamaForCausalLM:
    """A 2-layer Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,  # attention weights that move the logits
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def _seq2seq(kind: str):
    """A 2+2-layer BART or Marian; both dispatch through AttentionInterface (4.57 and 5.x)."""
    torch.manual_seed(0)
    options = dict(
        vocab_size=64,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=256,
        dropout=0.0,
        attention_dropout=0.0,
        init_std=0.2,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    if kind == "bart":
        return BartForConditionalGeneration(BartConfig(**options)).eval()
    return MarianMTModel(MarianConfig(**options)).eval()


def _left_padded(batch: int, length: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) (B, N): the second row left-padded to a third of its length."""
    ids = torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, : length // 3] = 0
    ids[mask == 0] = pad
    return ids, mask


def _generate(model, ids, mask, **kwargs):
    """Greedy generation of NEW tokens: (sequences (B, N'), logits (steps, B, vocab))."""
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )
    return out.sequences, torch.stack(out.logits)


def _assert_same_generation(got, want):
    torch.testing.assert_close(got[1], want[1], atol=ATOL, rtol=1e-4)
    assert torch.equal(got[0], want[0])


# -- decoder-only: Llama with GQA -----------------------------------------------------------
@pytest.mark.parametrize("implementation", DECODER_ONLY)
def test_llama_generates_with_effattn_states(implementation: str):
    model = _llama()
    model.set_attn_implementation(implementation)
    ids, mask = _left_padded(2, PROMPT, pad=0)
    want = _generate(model, ids, mask, use_cache=False)
    cache = hf.decoding_cache(model)
    assert isinstance(cache, hf.EffattnCache)
    got = _generate(model, ids, mask, past_key_values=cache)
    _assert_same_generation(got, want)
    backend = hf.registered_backend(implementation)
    assert len(cache.states) == model.config.num_hidden_layers
    for state in cache.states:
        assert isinstance(state, DecodeState) and state.backend == backend
        assert state.length == PROMPT + NEW - 1  # the last token is never fed back
        assert (state.shape.heads, state.shape.kv_heads) == (4, 2)
    assert cache.get_seq_length() == PROMPT + NEW - 1
    if implementation == "effattn_local_w4":
        assert all(state.k.shape[2] == 4 for state in cache.states)  # the ring, not the cache


def test_llama_decoding_steps_run_one_query_through_the_state():
    model = _llama()
    model.set_attn_implementation("effattn_linear")
    ids, mask = _left_padded(2, PROMPT, pad=0)
    cache = hf.decoding_cache(model)
    with mock.patch.object(
        DecodeState, "attend", autospec=True, side_effect=DecodeState.attend
    ) as spy:
        _generate(model, ids, mask, past_key_values=cache)
    query_lengths = [call.args[1].shape[2] for call in spy.call_args_list]
    layers = model.config.num_hidden_layers
    assert query_lengths == [PROMPT] * layers + [1] * layers * (NEW - 1)


def test_backend_that_cannot_decode_falls_back_to_keys_and_values():
    reasons = effattn.backend_class("lsh").decode_refusal
    assert reasons  # lsh cannot decode yet: its layers keep keys and values
    model = _llama()
    model.set_attn_implementation("effattn_lsh")
    ids, mask = _left_padded(2, PROMPT, pad=0)
    want = _generate(model, ids, mask, use_cache=False)
    cache = hf.decoding_cache(model)
    with pytest.warns(UserWarning, match="'lsh' cannot decode"):
        got = _generate(model, ids, mask, past_key_values=cache)
    _assert_same_generation(got, want)
    assert cache.states == [None, None]
    assert cache.layers[0].keys.shape == (2, 2, PROMPT + NEW - 1, 8)  # (B, Hkv, N, D)


def test_cache_refuses_a_model_running_transformers_attention():
    model = _llama()
    model.set_attn_implementation("sdpa")
    ids, mask = _left_padded(2, PROMPT, pad=0)
    with pytest.raises(ValueError, match="EffattnCache decodes with an effattn"):
        _generate(model, ids, mask, past_key_values=hf.EffattnCache(model))


def test_keys_that_never_reach_the_attention_call_are_refused():
    """A model that changed the keys between cache.update and attention (the layer's tag lost:
    simulated) would decode over the new keys only: the layer's next update refuses."""
    model = _llama()
    model.set_attn_implementation("effattn_sdpa")
    ids, mask = _left_padded(2, PROMPT, pad=0)
    with (
        mock.patch.object(hf, "_decoding_layer", return_value=None),
        pytest.raises(ValueError, match="never reached an effattn attention call"),
    ):
        _generate(model, ids, mask, past_key_values=hf.decoding_cache(model))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_beams": 2}, "beam search"), ({"output_attentions": True}, "output_attentions")],
)
def test_what_a_state_cannot_do_is_refused(kwargs, match):
    model = _llama()
    model.set_attn_implementation("effattn_full")
    ids, mask = _left_padded(2, PROMPT, pad=0)
    with pytest.raises(ValueError, match=match):
        _generate(model, ids, mask, past_key_values=hf.decoding_cache(model), **kwargs)


def test_sampling_with_several_sequences_per_prompt():
    model = _llama()
    model.set_attn_implementation("effattn_local_w4")
    ids, mask = _left_padded(2, PROMPT, pad=0)
    out = model.generate(
        ids,
        attention_mask=mask,
        past_key_values=hf.decoding_cache(model),
        max_new_tokens=NEW,
        do_sample=True,
        num_return_sequences=2,
    )
    assert out.shape == (4, PROMPT + NEW)


# -- encoder-decoder: cross-attention through effattn, not causal ----------------------------
@pytest.mark.parametrize("implementation", ENCODER_DECODER)
@pytest.mark.parametrize("kind", ["bart", "marian"])
def test_encoder_decoder_generates_with_effattn_states(kind: str, implementation: str):
    model = _seq2seq(kind)
    model.set_attn_implementation(implementation)
    ids, mask = _left_padded(2, SOURCE, pad=model.config.pad_token_id)
    want = _generate(model, ids, mask, use_cache=False)
    _assert_same_generation(_generate(model, ids, mask), want)  # transformers' own cache
    cache = hf.decoding_cache(model)
    assert isinstance(cache, transformers.EncoderDecoderCache)
    got = _generate(model, ids, mask, past_key_values=cache)
    _assert_same_generation(got, want)
    states = cache.self_attention_cache.states
    assert len(states) == 2 and all(s.length == NEW for s in states)  # start token + NEW - 1


def test_cross_attention_is_not_causal_and_takes_the_encoder_padding():
    model = _seq2seq("bart")
    model.set_attn_implementation("effattn_full")
    ids, mask = _left_padded(2, SOURCE, pad=model.config.pad_token_id)
    backend = hf.registered_backend("effattn_full")
    with mock.patch.object(
        type(backend), "forward", autospec=True, side_effect=type(backend).forward
    ) as spy:
        _generate(model, ids, mask, past_key_values=hf.decoding_cache(model))
    cross = [call for call in spy.call_args_list if call.args[2].shape[2] == SOURCE]
    decoder_calls = model.config.decoder_layers * NEW
    assert len(cross) >= decoder_calls  # every decoder layer at every step (+ the encoder's)
    for call in cross[-decoder_calls:]:
        assert call.args[1].shape[2] == 1  # one new query over the encoder's keys
        assert call.kwargs["causal"] is False
        torch.testing.assert_close(call.kwargs["key_padding_mask"], mask.bool())


# -- the pieces ------------------------------------------------------------------------------
def test_mask_function_takes_a_cross_attention_over_more_keys():
    """transformers 5.x asks for a cross-attention mask with the decoder's query positions and
    the encoder's keys: bidirectional, so no alignment of the last query with the last key."""
    mask = torch.ones(2, SOURCE, dtype=torch.bool)
    mask[1, :50] = False

    def every_key(batch_idx, head_idx, q_idx, kv_idx):
        return q_idx >= 0

    got = hf.key_padding_mask_interface(2, None, SOURCE, 0, every_key, mask, q_length=1, q_offset=0)
    torch.testing.assert_close(got, mask)
    with pytest.raises(ValueError, match="align the last query"):  # causal: still checked
        hf.key_padding_mask_interface(2, torch.arange(1), SOURCE, 0, None, mask)


def test_one_row_4d_mask_follows_the_layer():
    padding = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    padding[0, ..., :2] = False
    for prefer in (True, False):
        causal, got = hf.causal_and_padding_from_4d(padding, 1, 6, prefer=prefer)
        assert causal is prefer
        torch.testing.assert_close(got, padding[:, 0, 0])
