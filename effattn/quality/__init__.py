"""What each backend gives up: accuracy of small models trained on tasks generated here
(`effattn quality`), beside the training speed and memory of the same runs.

- tasks:   seeded generators: mqar, listops, nearest_recall (no downloads);
- model:   the model family, built from the drop-in effattn.MultiheadAttention;
- spec:    presets (effattn/quality/presets/*.toml) and command-line choices -> training points;
- train:   one training run, and the worker process that runs it;
- runner:  every point in a worker of its own, rows appended, resumable;
- report, plots: LRA Table 1's shape with speed and memory, the bubble chart, accuracy vs N;
- cli:     ``add_arguments`` and ``run`` of the command (``python -m effattn.quality``).
"""
