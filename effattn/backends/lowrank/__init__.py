"""Low-rank attention (Tay class LR): keys and values summarised along the sequence:
`linformer` (projections) and `nystrom` (landmarks). Helpers: ``projections`` (seeded
Gaussian projections, contiguous segments and their means) and ``pinv`` (Nystromformer's
iterative pseudo-inverse)."""
