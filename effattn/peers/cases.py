"""The comparisons of `effattn peers`: our candidates beside the public implementations of the
same algorithm, and how their outputs are compared. ``--only`` takes the keys (``full`` and
``sdpa`` select ``dense``); all forward, bidirectional unless the key says causal, fp32,
(B, H, N, D) = (1, 8, N, 64):

  dense    effattn `full` and `sdpa`  vs  torch SDPA, compiled flex_attention (no mask)
  local    effattn `local` w=256      vs  compiled flex_attention with a sliding-window BlockMask,
                                          local-attention 1.11.2 (exact_windowsize=True)
  bigbird  effattn `bigbird` b=64 r=3 vs  HF BigBirdBlockSparseAttention (train mode, dropout 0)
  lsh      effattn `lsh` b=64         vs  reformer-pytorch 1.4.4 LSHAttention, HF LSHSelfAttention
  xl       effattn.nn.TransformerXLAttention vs HF 4.57 RelPartialLearnableMultiHeadAttn
           (same weights; qlen N/2 + memory N/2, d_model 512, residual + LayerNorm on both)
  performer, performer_causal
           effattn `performer` m=256  vs  performer-pytorch 1.1.4 FastAttention (our features)
  linear, linear_causal
           effattn `linear`           vs  linear-attention-transformer 0.19.1 linear_attn,
                                          causal_linear_attn
  linformer  effattn `linformer` k=256, alone and as a layer with the peer's projections
           vs linformer 0.2.3 LinformerSelfAttention (our E, F in its proj_k, proj_v)
  nystrom  effattn `nystrom` m=256, alone and as a layer with the peer's projections
           vs nystrom-attention 0.0.14 NystromAttention (6 iterations, residual conv off)

The kernel and low-rank peers are attention on q, k, v (performer, linear) or layers with their
own q/k/v/out projections (linformer, nystrom): ours is timed alone against both, and as the
same layer (the peer's projection modules around our backend) against the layers, so each row
says what its ratio compares. Causal comparisons run ours causal too. Agreement: max
|ours - peer| and ||ours - peer|| / ||peer|| where the semantics match, else the reason.
Each candidate is a case of effattn.harness.cases (:mod:`effattn.peers.measure`): ours runs the
effattn backend its row names (xl for the layer), a peer is backend ``peer:<tag>``. Building a
comparison imports no peer: each is imported when its candidate is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from effattn.peers import kernel_lowrank as klp
from effattn.peers import sparse, xl
from effattn.peers.candidates import (
    Agreement,
    Builder,
    Ours,
    flex_dense,
    flex_sliding_window,
    hf_bigbird,
    linear_agreement,
    local_attention_exact,
    lsh_agreement,
    lsh_builders,
    nystrom_agreement,
    ours_backend,
    performer_agreement,
    torch_sdpa,
    xl_layer,
)

ALIASES = {"full": "dense", "sdpa": "dense"}  # --only keys that select another comparison


@dataclass(frozen=True)
class Peer:
    name: str  # the public implementation, as users know it
    build: Builder  # raises ImportError when the peer is not installed (-> a skipped row)
    compare_outputs: bool = True  # agreement from the timed calls' outputs (same semantics)
    agreement_check: Callable[[int], Agreement] | None = None  # a separate check, given N
    agreement_note: str = ""  # how agreement is measured, or why there is none
    only_for: tuple[str, ...] | None = None  # our candidates the agreement concerns (None: all)
    time_only_note: str = ""  # the note of the other candidates' rows (time and memory only)
    tag: str = ""  # its rows' backend is peer:<tag>; "" takes the name's first word

    @property
    def backend(self) -> str:
        """The backend of its rows: ``peer:local-attention``."""
        return "peer:" + (self.tag or self.name.split()[0])


@dataclass(frozen=True)
class Comparison:
    key: str  # dense, local, bigbird, lsh, xl, ... (what --only selects)
    ours: dict[str, Ours]  # our candidates, by name
    peers: tuple[Peer, ...]  # the public implementations of the same algorithm
    causal: bool = False  # ours and the peers run causal


# -- the comparisons -----------------------------------------------------------------------------
SAME = "same inputs, outputs compared"


def _exact_and_sparse(bucket_size: int, n_hashes: int) -> dict[str, Comparison]:
    """dense, local, bigbird, lsh, xl."""
    lsh = lsh_builders(bucket_size, n_hashes)
    lsh_note = (
        f"timed with {n_hashes} hashes (rounds differ by design: peers chain rounds in one "
        f"sorted sequence); agreement: N={2 * bucket_size}, 1 hash"
    )
    return {
        "dense": Comparison(
            "dense",
            {"effattn full": ours_backend("full"), "effattn sdpa": ours_backend("sdpa")},
            (
                Peer("torch SDPA", torch_sdpa, agreement_note=SAME, tag="torch-sdpa"),
                Peer(
                    "flex_attention (compiled, dense)",
                    flex_dense,
                    agreement_note=SAME,
                    tag="flex_attention",
                ),
            ),
        ),
        "local": Comparison(
            "local",
            {f"effattn local w={sparse.WINDOW}": ours_backend("local", window=sparse.WINDOW)},
            (
                Peer(
                    f"flex_attention (compiled, sliding window {sparse.WINDOW})",
                    flex_sliding_window,
                    agreement_note=SAME,
                    tag="flex_attention",
                ),
                Peer(
                    "local-attention (exact_windowsize=True)",
                    local_attention_exact,
                    agreement_note=SAME,
                    tag="local-attention",
                ),
            ),
        ),
        "bigbird": Comparison(
            "bigbird",
            {"effattn bigbird b=64 r=3": ours_backend("bigbird")},
            (
                Peer(
                    "HF BigBirdBlockSparseAttention (train, dropout 0)",
                    hf_bigbird,
                    compare_outputs=False,
                    agreement_note="n/a: different random blocks (HF draws its own per call "
                    "in train mode; eval mode draws none)",
                    tag="hf-bigbird",
                ),
            ),
        ),
        "lsh": Comparison(
            "lsh",
            {
                f"effattn lsh b={bucket_size} h={n_hashes}": Ours(
                    "lsh", lsh["ours"], (("bucket_size", bucket_size), ("n_hashes", n_hashes))
                )
            },
            (
                Peer(
                    "reformer-pytorch LSHAttention",
                    lsh["reformer"],
                    agreement_check=lsh_agreement("reformer", bucket_size),
                    agreement_note=lsh_note,
                    tag="reformer-pytorch",
                ),
                Peer(
                    "HF LSHSelfAttention",
                    lsh["hf"],
                    agreement_check=lsh_agreement("hf", bucket_size),
                    agreement_note=lsh_note,
                    tag="hf-lsh",
                ),
            ),
        ),
        "xl": Comparison(
            "xl",
            {"effattn.nn.TransformerXLAttention": Ours("xl", xl_layer(xl.OURS))},
            (
                Peer(
                    "HF RelPartialLearnableMultiHeadAttn",
                    xl_layer("hf_transformers"),
                    agreement_note="same weights and inputs, outputs compared",
                    tag="hf-transfo-xl",
                ),
            ),
        ),
    }


def _kernel_and_linear() -> dict[str, Comparison]:
    """performer, linear, performer_causal, linear_causal."""
    found: dict[str, Comparison] = {}
    for causal in (False, True):
        tag = "_causal" if causal else ""
        mode = " causal" if causal else ""
        found["performer" + tag] = Comparison(
            "performer" + tag,
            {f"effattn performer m={klp.FEATURES}{mode}": ours_backend("performer", causal=causal)},
            (
                Peer(
                    f"performer-pytorch FastAttention{mode} (our features)",
                    klp.performer_peer(causal),
                    agreement_check=performer_agreement(causal),
                    agreement_note="attention only on both sides; agreement with their own "
                    "feature and product functions, their eps = 1e-4 feature offset set to 0",
                    tag="performer-pytorch",
                ),
            ),
            causal=causal,
        )
        found["linear" + tag] = Comparison(
            "linear" + tag,
            {f"effattn linear{mode}": ours_backend("linear", causal=causal)},
            (
                Peer(
                    f"linear-attention-transformer {'causal_' if causal else ''}linear_attn",
                    klp.linear_peer(causal),
                    compare_outputs=False,
                    agreement_check=None if causal else linear_agreement,
                    agreement_note=(
                        "n/a: different feature maps (theirs exp(k), softmax(q)) and their "
                        "queries skip their own 64-position bucket"
                        if causal
                        else "attention only on both sides; agreement: our product with their "
                        "features (softmax over D of q, over N of k), theirs elu+1 differs"
                    ),
                    tag="linear-attention-transformer",
                ),
            ),
            causal=causal,
        )
    return found


def _low_rank_layers() -> dict[str, Comparison]:
    """linformer and nystrom: our backend alone and as the peer's layer, beside the layer."""
    alone = "time only: ours is attention alone, the peer's layer includes its q/k/v/out "
    linformer_layer = f"effattn linformer k={klp.RANK} layer"
    nystrom_layer = f"effattn nystrom m={klp.LANDMARKS} layer"
    return {
        "linformer": Comparison(
            "linformer",
            {
                f"effattn linformer k={klp.RANK}": ours_backend("linformer", rank=klp.RANK),
                linformer_layer: Ours(
                    "linformer",
                    klp.layer_builder("ours", klp.linformer_layers),
                    (("rank", klp.RANK),),
                ),
            },
            (
                Peer(
                    f"linformer LinformerSelfAttention k={klp.RANK} (layer)",
                    klp.layer_builder("peer", klp.linformer_layers),
                    agreement_note="layer vs layer: the same weights, our E and F as its "
                    "proj_k and proj_v; outputs compared",
                    only_for=(linformer_layer,),
                    time_only_note=alone + "projections (512 x 512)",
                    tag="linformer",
                ),
            ),
        ),
        "nystrom": Comparison(
            "nystrom",
            {
                f"effattn nystrom m={klp.LANDMARKS}": ours_backend(
                    "nystrom", landmarks=klp.LANDMARKS
                ),
                nystrom_layer: Ours(
                    "nystrom",
                    klp.layer_builder("ours", klp.nystrom_layers),
                    (("landmarks", klp.LANDMARKS),),
                ),
            },
            (
                Peer(
                    f"nystrom-attention NystromAttention m={klp.LANDMARKS} "
                    "(layer, no residual conv)",
                    klp.layer_builder("peer", klp.nystrom_layers),
                    compare_outputs=False,
                    agreement_check=nystrom_agreement,
                    agreement_note="layer vs layer, same weights; agreement with 1 head (the "
                    "peer normalises its pseudo-inverse over all heads and the batch) and N a "
                    "multiple of m (it pads N with zeros that count in its landmark means)",
                    only_for=(nystrom_layer,),
                    time_only_note=alone + "projections (512 x 1536, 512 x 512)",
                    tag="nystrom-attention",
                ),
            ),
        ),
    }


def comparisons(bucket_size: int = 64, n_hashes: int = 4) -> dict[str, Comparison]:
    """Every comparison, by key, in table order; peers are imported only when built."""
    return {
        **_exact_and_sparse(bucket_size, n_hashes),
        **_kernel_and_linear(),
        **_low_rank_layers(),
    }


def selected(only: str, available: dict[str, Comparison]) -> list[Comparison]:
    """The comparisons named in ``only`` (comma-separated keys; empty = all), in table order."""
    if not only:
        return list(available.values())
    keys = {ALIASES.get(k.strip(), k.strip()) for k in only.split(",") if k.strip()}
    unknown = sorted(keys - set(available))
    if unknown:
        known = ", ".join([*available, *ALIASES])
        raise ValueError(f"--only: expected some of {known}, got {', '.join(unknown)}")
    return [c for key, c in available.items() if key in keys]
