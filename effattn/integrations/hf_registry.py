"""The attention implementations effattn registered in transformers, by name, and the tag by
which an EffattnCache layer hands its keys to the attention call: what both the integration
(effattn.integrations.huggingface) and its cache (effattn.integrations.huggingface_cache) read,
so that neither imports the other at import time."""

from __future__ import annotations

from effattn.backend import Backend

LAYER_TAG = "_effattn_cache_layer"  # on the keys an EffattnCache layer hands over: that layer
REGISTERED: dict[str, Backend] = {}  # the names effattn registered, and their backends


def registered_backend(name: str) -> Backend:
    """The backend that the attention implementation ``name`` runs (one effattn registered)."""
    try:
        return REGISTERED[name]
    except KeyError:
        known = ", ".join(sorted(REGISTERED)) or "none yet: call register()"
        raise ValueError(
            f"name: expected an attention implementation registered by effattn ({known}), "
            f"got {name!r}"
        ) from None
