"""Low-rank attention (Tay class LR): keys and values summarised along the sequence:
`linformer` (projections) and `nystrom` (landmarks)."""
