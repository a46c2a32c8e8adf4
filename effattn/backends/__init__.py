"""The built-in backends, one module each. Every module here is imported on first use of the
registry, so adding a backend is adding a file with a ``@register_backend`` class."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
