"""The built-in backends: one module per backend, families with their helpers in subpackages
(``sparse/``, ``lsh/``, ``xl/``, ...). Every module here is imported on first use of the registry,
so adding a backend is adding a file with a ``@register_backend`` class."""

import importlib
import pkgutil

for _module in pkgutil.walk_packages(__path__, prefix=f"{__name__}."):
    importlib.import_module(_module.name)
