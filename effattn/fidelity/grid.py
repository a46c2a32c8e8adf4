"""The backends and option settings `effattn fidelity` measures, scaled to N = 512.

Each setting belongs to a curve of the plot: one backend with the options that stay fixed, the
swept option varying along the curve. A backend that is not registered in this install is
skipped with the reason (the grid names backends that other work adds).

At N = 512 (the model's 512 positions):

- ``local`` window 32 / 64 / 128 / 256 (256: the sweep's Tay row);
- ``strided`` with its defaults (window and stride about sqrt(N));
- ``bigbird`` block 32 / 64 (64 is its default: 3 window + 2 global + 3 random blocks of the
  8 there are at N = 512, every pair);
- ``lsh`` bucket 32 and 64, 1 / 2 / 4 / 8 hash rounds (bucket 64 with 4 rounds: its default);
- ``xl`` is causal only, so it runs causally against a causal exact reference (the same
  pretrained encoder with every layer made causal): segments of 64 / 128 / 256 with as much
  memory, the plain segment pattern (``relative="none"``), and its default (segments of 128,
  relative-position bias from fixed random parameters the model never saw);
- ``linformer`` rank 64 / 128 / 256 with seeded Gaussian projections (its default; any N: the
  projection's columns depend only on the seed) and with the paper's mean pooling;
- ``performer`` 64 / 128 / 256 random features; ``nystrom`` 32 / 64 / 128 / 256 landmarks
  (256: its default); ``linear`` (no option at N = 512: ``chunk_size`` is for causal calls).
"""

from __future__ import annotations

from dataclasses import dataclass

from effattn.registry import BackendSpec, backend_class, list_backends, parse_backend_spec


@dataclass(frozen=True)
class Setting:
    """One backend with options to measure, and the plot curve it belongs to."""

    curve: str  # the curve's name in the plot and tables (e.g. "lsh, bucket 32")
    spec: BackendSpec  # the backend and its options

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def causal(self) -> bool:
        """Run causally (against a causal exact reference): only for causal-only backends."""
        return not backend_class(self.spec.name).supports_bidirectional


@dataclass(frozen=True)
class Skipped:
    """A setting of the grid that this install cannot measure, and why."""

    curve: str
    label: str  # the backend spec as written
    reason: str


# (curve, backend specs as `effattn sweep --backends` writes them), in report order.
DEFAULT_GRID: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("exact", ("full", "sdpa")),
    ("local", tuple(f"local:window={w}" for w in (32, 64, 128, 256))),
    ("strided", ("strided",)),
    ("bigbird", ("bigbird:block_size=32", "bigbird:block_size=64")),
    *(
        (f"lsh, bucket {b}", tuple(f"lsh:bucket_size={b},n_hashes={h}" for h in (1, 2, 4, 8)))
        for b in (32, 64)
    ),
    ("xl (causal)", tuple(f"xl:segment_len={s},mem_len={s},relative=none" for s in (64, 128, 256))),
    ("xl (causal), relative bias", ("xl",)),
    ("linformer", tuple(f"linformer:rank={r}" for r in (64, 128, 256))),
    ("linformer, mean", tuple(f"linformer:rank={r},projection=mean" for r in (64, 128, 256))),
    ("performer", tuple(f"performer:num_features={f}" for f in (64, 128, 256))),
    ("nystrom", tuple(f"nystrom:landmarks={m}" for m in (32, 64, 128, 256))),
    ("linear", ("linear",)),
)


def settings_of(
    grid: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_GRID,
) -> tuple[list[Setting], list[Skipped]]:
    """The grid's settings whose backend is registered here, and the others with the reason.
    A spec with a bad option or value raises (ValueError/TypeError naming it)."""
    registered = set(list_backends())
    settings, skipped = [], []
    for curve, specs in grid:
        for text in specs:
            name = text.partition(":")[0].strip()
            if name not in registered:
                reason = f"backend {name!r} is not registered in this install"
                skipped.append(Skipped(curve, text, reason))
                continue
            settings.append(Setting(curve, parse_backend_spec(text)))
    return settings, skipped


def settings_from_specs(texts: list[str]) -> list[Setting]:
    """Settings from ``--backends`` specs (``local:window=64``), one curve per backend name.
    Unknown backends and options raise, as in `effattn sweep`."""
    return [Setting(spec.name, spec) for spec in map(parse_backend_spec, texts)]
