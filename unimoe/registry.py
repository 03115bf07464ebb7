"""One registry mechanism for everything pluggable.

Routers, expert types, codec tokenizers, metric backends, task sequence builders, vision
encoders and text tokenizers all live in a :class:`Registry`. In-tree components register
with a decorator; a separately installed package adds more through Python entry points in
the group ``unimoe.<registry name>`` (for example ``unimoe.routers``) without touching
core code.

A component is named in YAML or Python by a *spec* (:data:`ComponentSpec`):

* ``"top_p"``                                   - a registered name
* ``"my_pkg.routers.FancyRouter"``              - an import path (``pkg.mod.Class`` or ``pkg.mod:Class``)
* ``{"class_path": "top_p", "init_args": {...}}`` - Lightning-style, name or import path
* ``{"name": "top_p", "top_p": 0.7}``           - shorthand, extra keys are init args
* an already built object                       - passed through unchanged

Structural arguments that the caller knows (``hidden_size``, ``num_experts``...) are passed
as *context*: each is given to the constructor only if its signature accepts it, so a
plug-in does not have to accept arguments it does not need. User init args that the
constructor does not accept are an error naming the field.
"""

from __future__ import annotations

import importlib
import inspect
from importlib import metadata
from typing import Any, Callable, Dict, Generic, Iterator, Mapping, TypeVar, Union

T = TypeVar("T")

ComponentSpec = Union[str, Dict[str, Any]]
"""A registered name, an import path, or a dict with ``class_path``/``init_args`` or ``name``."""

ENTRY_POINT_PREFIX = "unimoe."


class RegistryError(ValueError):
    """A component spec could not be resolved or built; the message says what to fix."""


class Registry(Generic[T]):
    """A named collection of component factories (classes or functions) of one kind.

    ``kind`` is the singular noun used in error messages (``"router"``); ``name`` is the
    registry's plural name, which is also the suffix of its entry-point group.
    """

    def __init__(self, name: str, kind: str, base: type | None = None) -> None:
        self.name = name
        self.kind = kind
        self.base = base
        self.entry_point_group = ENTRY_POINT_PREFIX + name
        self._factories: dict[str, Callable[..., T]] = {}
        self._entry_points_loaded = False

    # ------------------------------------------------------------------ registration
    def register(self, name: str, factory: Callable[..., T] | None = None):
        """Register ``factory`` under ``name``; usable as ``@REGISTRY.register("name")``."""

        def decorator(obj: Callable[..., T]) -> Callable[..., T]:
            existing = self._factories.get(name)
            if existing is not None and existing is not obj:
                raise RegistryError(
                    f"{self.kind} name {name!r} is already registered to "
                    f"{_qualname(existing)}; pick another name for {_qualname(obj)}"
                )
            self._factories[name] = obj
            return obj

        return decorator(factory) if factory is not None else decorator

    def load_entry_points(self) -> None:
        """Import every plug-in that declares this registry's entry-point group (once)."""
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.entry_point_group):
            if ep.name in self._factories:
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plug-in must not hide the others
                raise RegistryError(
                    f"plug-in entry point {ep.name!r} = {ep.value!r} in group "
                    f"{self.entry_point_group!r} failed to import: {exc}"
                ) from exc
            # An entry point may name the component itself or a module that registers it.
            if not inspect.ismodule(obj):
                self.register(ep.name, obj)

    # ------------------------------------------------------------------ lookup
    def names(self) -> list[str]:
        self.load_entry_points()
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> Callable[..., T]:
        """Resolve a registered name or an import path to its factory."""
        self.load_entry_points()
        if name in self._factories:
            return self._factories[name]
        if "." in name or ":" in name:
            return _import_path(name, self.kind)
        raise RegistryError(
            f"unknown {self.kind} {name!r}. Registered {self.name}: "
            f"{', '.join(self.names()) or '(none)'}. "
            f"A full import path (package.module.Class) also works."
        )

    # ------------------------------------------------------------------ building
    def build(self, spec: ComponentSpec | T, **context: Any) -> T:
        """Build a component from ``spec``; ``context`` kwargs go only where accepted."""
        if spec is None:
            raise RegistryError(f"no {self.kind} given; registered {self.name}: {', '.join(self.names())}")
        if not isinstance(spec, (str, Mapping)):
            if self.base is not None and not isinstance(spec, self.base) and callable(spec):
                return self._call(spec, {}, context, label=_qualname(spec))
            return spec  # already built
        target, init_args = self._parse(spec)
        factory = self.get(target)
        return self._call(factory, init_args, context, label=target)

    def _parse(self, spec: ComponentSpec) -> tuple[str, dict[str, Any]]:
        if isinstance(spec, str):
            return spec, {}
        spec = dict(spec)
        if "class_path" in spec:
            target = spec.pop("class_path")
            init_args = dict(spec.pop("init_args", None) or {})
            if spec:
                raise RegistryError(
                    f"{self.kind} spec has unexpected keys {sorted(spec)} next to class_path; "
                    f"put constructor arguments under init_args"
                )
        elif "name" in spec:
            target = spec.pop("name")
            init_args = spec
        else:
            raise RegistryError(
                f"a {self.kind} spec needs 'class_path' (with optional 'init_args') or 'name'; "
                f"got keys {sorted(spec)}"
            )
        if not isinstance(target, str):
            raise RegistryError(f"{self.kind} class_path/name must be a string, got {target!r}")
        return target, init_args

    def _call(self, factory: Callable[..., T], init_args: dict[str, Any], context: dict[str, Any], label: str) -> T:
        try:
            signature = inspect.signature(factory)
        except (TypeError, ValueError):  # some builtins have no signature
            return factory(**context, **init_args)
        params = signature.parameters
        takes_var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        accepted = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        unknown = [k for k in init_args if k not in accepted and not takes_var_kwargs]
        if unknown:
            raise RegistryError(
                f"{self.kind} {label!r} got unknown argument(s) {unknown}; "
                f"it accepts: {', '.join(sorted(accepted)) or '(none)'}"
            )
        kwargs = {k: v for k, v in context.items() if takes_var_kwargs or k in accepted}
        kwargs.update(init_args)
        missing = [
            n
            for n, p in params.items()
            if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and n not in kwargs
        ]
        if missing:
            raise RegistryError(f"{self.kind} {label!r} is missing required argument(s) {missing}")
        obj = factory(**kwargs)
        if self.base is not None and inspect.isclass(factory) is False and not isinstance(obj, self.base):
            raise RegistryError(
                f"{self.kind} factory {label!r} returned {type(obj).__name__}, expected a {self.base.__name__}"
            )
        return obj

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {len(self._factories)} registered)"


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _import_path(path: str, kind: str) -> Callable[..., Any]:
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RegistryError(f"cannot import module {module_name!r} for {kind} {path!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise RegistryError(f"module {module_name!r} has no attribute {attr!r} ({kind} {path!r})") from exc


# ---------------------------------------------------------------------- the registries
ROUTERS: Registry = Registry("routers", "router")
EXPERTS: Registry = Registry("experts", "expert type")
CODECS: Registry = Registry("codecs", "codec")
METRICS: Registry = Registry("metrics", "metric backend")
TASKS: Registry = Registry("tasks", "task builder")
VISION_ENCODERS: Registry = Registry("vision_encoders", "vision encoder")
TEXT_TOKENIZERS: Registry = Registry("text_tokenizers", "text tokenizer")
SCORERS: Registry = Registry("eval_scorers", "evaluation metric")
"""Metric definitions (WER, SIM, FAD...) that combine a METRICS backend's outputs into a score."""

ALL_REGISTRIES: tuple[Registry, ...] = (
    ROUTERS, EXPERTS, CODECS, METRICS, TASKS, VISION_ENCODERS, TEXT_TOKENIZERS, SCORERS,
)


def load_all_plugins() -> None:
    """Import every installed plug-in so its classes are known before config parsing."""
    for registry in ALL_REGISTRIES:
        registry.load_entry_points()
