"""effattn's backends beside the public implementations of the same algorithms (`effattn peers`).

- :mod:`~effattn.peers.inputs`: the shared shape (B, H, N, D) = (1, 8, N, 64) and the seeded
  q, k, v every candidate sees;
- the peer wrappers, one module per family, each public implementation called on our layout
  with its conventions aligned to ours: :mod:`~effattn.peers.sparse` (flex_attention,
  local-attention, HF BigBird), :mod:`~effattn.peers.lsh` (reformer-pytorch, HF Reformer),
  :mod:`~effattn.peers.xl` (HF Transformer-XL), :mod:`~effattn.peers.kernel_lowrank`
  (performer-pytorch, linear-attention-transformer, linformer, nystrom-attention);
- :mod:`~effattn.peers.cases`: the comparisons (ours beside which peers, and how their outputs
  are compared);
- :mod:`~effattn.peers.measure`: every candidate a case of effattn.harness.cases, timed into a
  run (one effattn.harness.rows.Row each), and one line per (ours, peer) pair computed from the
  rows: time and memory ratios, and the output agreement;
- :mod:`~effattn.peers.report`: the table, the versions and the report folder;
- :mod:`~effattn.peers.cli`: the command.

The peers are the ``peers`` extra (pip install 'effattn[peers]'). Importing this package or
any module in it imports none of them: each is imported when its candidate is built, and one
that is not installed becomes a skipped row with the reason.
"""
