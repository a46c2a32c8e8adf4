"""The backend registry: register a backend class under a name, build it with checked options."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from effattn.backend import Backend

B = TypeVar("B", bound=type[Backend])

_REGISTRY: dict[str, type[Backend]] = {}


def register_backend(name: str) -> Callable[[B], B]:
    """Class decorator: register a :class:`Backend` subclass (a frozen dataclass) under ``name``.

    >>> @register_backend("mine")
    ... @dataclass(frozen=True)
    ... class MyAttention(Backend):
    ...     temperature: float = 1.0  # an option, checked and documented like any other
    ...     def forward(self, q, k, v, *, causal, key_padding_mask, scale):
    ...         ...
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_backend: expected an identifier as name, got {name!r}")

    def decorate(cls: B) -> B:
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise TypeError(f"register_backend({name!r}): expected a Backend subclass, got {cls!r}")
        if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
            raise TypeError(
                f"register_backend({name!r}): {cls.__name__} must be decorated with "
                "@dataclass(frozen=True) (its fields are its options)"
            )
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            previous = _REGISTRY[name]
            raise ValueError(
                f"register_backend: the name {name!r} is taken by "
                f"{previous.__module__}.{previous.__qualname__}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_builtin_backends() -> None:
    import effattn.backends  # noqa: F401  (registers the built-in backends on import)


def list_backends() -> list[str]:
    """The names of the registered backends, sorted."""
    _load_builtin_backends()
    return sorted(_REGISTRY)


def backend_class(name: str) -> type[Backend]:
    """The class registered under ``name``; a ValueError lists the known names otherwise."""
    _load_builtin_backends()
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a backend name (str), got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"backend: unknown backend {name!r} (known: {', '.join(sorted(_REGISTRY))})"
        ) from None


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        args = typing.get_args(hint)
        return (
            isinstance(value, tuple)
            and len(value) == len(args)
            and all(_matches(x, a) for x, a in zip(value, args, strict=True))
        )
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a hint we do not check (the backend's __post_init__ may)


def check_options(cls: type[Backend], options: dict[str, Any]) -> None:
    """Unknown names and values of the wrong type raise, naming the option and what it expects."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        valid = ", ".join(fields) if fields else "none: it takes no options"
        raise ValueError(
            f"backend {cls.name!r}: unknown option{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))} (valid: {valid})"
        )
    hints = typing.get_type_hints(cls)
    for key, value in options.items():
        hint = hints.get(key, Any)
        if not _matches(value, hint):
            raise TypeError(
                f"backend {cls.name!r}: option {key!r} expected {_describe(hint)}, "
                f"got {type(value).__name__} {value!r}"
            )


def parse_option_value(cls: type[Backend], key: str, text: str) -> Any:
    """Turn the text of an option (from the command line: ``window=256``) into its typed value."""
    if key not in {f.name for f in dataclasses.fields(cls)}:
        check_options(cls, {key: None})  # raises: unknown option, listing the valid ones
    hint = typing.get_type_hints(cls)[key]
    candidates = (
        typing.get_args(hint)
        if typing.get_origin(hint)
        in (
            typing.Union,
            types.UnionType,
        )
        else (hint,)
    )
    lowered = text.strip().lower()
    for candidate in candidates:
        if candidate is type(None) and lowered in ("none", "null"):
            return None
        if candidate is bool and lowered in ("true", "false", "1", "0", "yes", "no"):
            return lowered in ("true", "1", "yes")
        if candidate is int:
            try:
                return int(text)
            except ValueError:
                continue
        if candidate is float:
            try:
                return float(text)
            except ValueError:
                continue
        if typing.get_origin(candidate) is Literal and text in map(str, typing.get_args(candidate)):
            return next(a for a in typing.get_args(candidate) if str(a) == text)
        if candidate is str:
            return text
    raise ValueError(
        f"backend {cls.name!r}: option {key!r} expected {_describe(hint)}, got {text!r}"
    )


def get_backend(name: str | Backend, **options: Any) -> Backend:
    """A backend instance: ``get_backend("local", window=128)``. Options are checked by name and
    type; the backend's own checks of their values raise ValueError naming the option."""
    if isinstance(name, Backend):
        if options:
            raise ValueError(
                f"backend: options {sorted(options)} were given with a backend instance "
                f"{name!r}; set them on the instance instead"
            )
        return name
    cls = backend_class(name)
    check_options(cls, options)
    return cls(**options)


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """A backend name and its options, as written ``local:window=256``."""

    name: str  # a registered backend name
    options: tuple[tuple[str, Any], ...] = ()  # (option, typed value) pairs, sorted by option

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.options)


def parse_backend_spec(text: str) -> BackendSpec:
    """``"local:window=256"`` -> BackendSpec("local", (("window", 256),)), checked against the
    registry: an unknown backend or option, or a bad value, raises ValueError/TypeError."""
    name, _, rest = text.strip().partition(":")
    cls = backend_class(name)
    options: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"backend {text!r}: expected options as key=value, got {item!r}")
        options[key.strip()] = parse_option_value(cls, key.strip(), value.strip())
    get_backend(name, **options)  # the backend's own checks of the values
    return BackendSpec(name, tuple(sorted(options.items())))
