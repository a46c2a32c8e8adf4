"""Adapters that put effattn backends inside other libraries' models.

Each adapter lives in its own module and imports its library lazily, so ``import effattn`` (and
``import effattn.integrations``) works without any of them:

- :mod:`effattn.integrations.huggingface`: effattn backends as transformers attention
  implementations (``attn_implementation="effattn_local"``); needs ``pip install 'effattn[hf]'``.
  Its cache for ``generate()``, which decodes with each backend's own state, is in
  :mod:`effattn.integrations.huggingface_cache`; what both read is in
  :mod:`effattn.integrations.hf_registry`.
"""
