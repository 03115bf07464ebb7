"""One registry mechanism for everything pluggable.

Routers, expert types, codec tokenizers, metric backends, tasks, vision encoders, text
tokenizers, evaluation scorers and the Lightning classes recipes name (stages, data modules,
callbacks) all live in a :class:`Registry`. Every component, in-tree or from a separately
installed package, is declared the same way: a Python entry point in the group
``unimoe.<registry name>`` (for example ``unimoe.routers``) naming the object::

    [project.entry-points."unimoe.routers"]
    top_p = "unimoe.moe.routers:TopPRouter"       # unimoe's own pyproject.toml
    learned_threshold = "my_pkg.routers:LearnedThresholdRouter"   # a plug-in's

Entry points are read from the installed package metadata (no import), and a component's
module is imported only when its name is first used. :meth:`Registry.register` remains for
components made at run time (tests, notebooks); in-tree code does not use it.

A component is named in YAML or Python by a *spec* (:data:`ComponentSpec`):

* ``"top_p"``                                   - a registered name
* ``"my_pkg.routers.FancyRouter"``              - an import path (``pkg.mod.Class`` or ``pkg.mod:Class``)
* ``{"class_path": "top_p", "init_args": {...}}`` - the YAML spelling (docs/training.md, "Recipes")
* ``{"name": "top_p", "top_p": 0.7}``           - shorthand, extra keys are init args (Python, older checkpoints)
* an already built object                       - passed through unchanged

Structural arguments that the caller knows (``hidden_size``, ``num_experts``...) are passed
as *context*: each is given to the constructor only if its signature accepts it, so a
plug-in does not have to accept arguments it does not need. User init args that the
constructor does not accept are an error naming the field.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import sys
from importlib import metadata
from typing import Any, Callable, Dict, Generic, Iterator, Mapping, TypeVar, Union

T = TypeVar("T")

ComponentSpec = Union[str, Dict[str, Any]]
"""A registered name, an import path, or a dict with ``class_path``/``init_args`` or ``name``."""


class ComponentField:
    """The type of a config field that names a registry component (``router``, ``codec``, ``vision``...).

    jsonargparse (LightningCLI) claims every ``{class_path, init_args}`` mapping it meets inside
    a config for its own classes, and fails on registry names like ``top_p``. Fields of this
    type are opaque to it: the parser keeps the spec as it was written and hands it over
    wrapped; the dataclass (or module) unwraps it with :func:`plain_spec` and the registry
    resolves it when it builds the component. So recipes spell every component the same way,
    ``{class_path: top_p, init_args: {top_p: 0.7}}``, from the stage module down to the router.
    """

    __slots__ = ("spec",)

    def __init__(self, spec: Any) -> None:
        spec = plain_spec(spec)
        if isinstance(spec, str) and spec.lstrip().startswith("{"):  # a mapping given on the command line
            import yaml

            spec = yaml.safe_load(spec)
        if hasattr(spec, "as_dict") and callable(spec.as_dict):  # a jsonargparse Namespace
            spec = spec.as_dict()
        if not isinstance(spec, (str, dict)):
            raise ValueError(f"a component spec must be a name, an import path or a mapping with class_path "
                             f"(+ init_args) or name, got {type(spec).__name__} {spec!r}")
        self.spec = spec

    def __repr__(self) -> str:
        return f"ComponentField({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return plain_spec(other) == self.spec


def plain_spec(value: Any) -> Any:
    """A :class:`ComponentField` (or a list of them) as the plain spec it holds; anything else unchanged."""
    if isinstance(value, ComponentField):
        return value.spec
    if isinstance(value, list):
        return [plain_spec(v) for v in value]
    return value


def spec_parts(spec: Any) -> tuple[Any, dict[str, Any]]:
    """``(name, init args)`` of a component spec in any spelling (``{class_path, init_args}``, ``{name, ...}``,
    a bare name); a built object comes back as ``(object, {})``. Two specs that build the same thing compare equal."""
    spec = plain_spec(spec)
    if isinstance(spec, Mapping) and "class_path" in spec:
        return spec["class_path"], dict(spec.get("init_args") or {})
    if isinstance(spec, Mapping) and "name" in spec:
        return spec["name"], {k: v for k, v in spec.items() if k != "name"}
    return spec, {}


def _register_with_jsonargparse() -> None:
    try:
        from jsonargparse.typing import register_type
    except ImportError:  # jsonargparse is a dependency; without it there is no YAML parsing to protect
        return
    register_type(ComponentField, serializer=plain_spec, deserializer=ComponentField)


_register_with_jsonargparse()

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
        self._entry_points: dict[str, list[metadata.EntryPoint]] | None = None

    # ------------------------------------------------------------------ registration
    def register(self, name: str, factory: Callable[..., T] | None = None):
        """Register ``factory`` under ``name`` at run time; usable as ``@REGISTRY.register("name")``.

        Installed components are declared as entry points instead (see the module docstring).
        """

        def decorator(obj: Callable[..., T]) -> Callable[..., T]:
            existing = self._factories.get(name)
            if existing is None and name in self._declared():
                existing_ref = ", ".join(sorted(ep.value for ep in self._declared()[name]))
                raise RegistryError(f"{self.kind} name {name!r} is already declared by the entry point {existing_ref}; "
                                    f"pick another name for {_qualname(obj)}")
            if existing is not None and existing is not obj:
                raise RegistryError(
                    f"{self.kind} name {name!r} is already registered to "
                    f"{_qualname(existing)}; pick another name for {_qualname(obj)}"
                )
            self._factories[name] = obj
            return obj

        return decorator(factory) if factory is not None else decorator

    def _declared(self) -> dict[str, list[metadata.EntryPoint]]:
        """Entry points of this registry's group by name, read once from the package metadata (nothing imported)."""
        if self._entry_points is None:
            self._entry_points = _installed_entry_points(tuple(sys.path)).get(self.entry_point_group, {})
        return self._entry_points

    def _load(self, name: str) -> Callable[..., T]:
        points = self._declared()[name]
        if len({ep.value for ep in points}) > 1:
            owners = "; ".join(sorted(f"{ep.value} (package {_dist_name(ep)})" for ep in points))
            raise RegistryError(f"{self.kind} name {name!r} is declared by more than one installed package: {owners}. "
                                f"Uninstall one of them or rename its entry point.")
        ep = points[0]
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plug-in must say which entry point broke
            raise RegistryError(
                f"plug-in entry point {ep.name!r} = {ep.value!r} in group "
                f"{self.entry_point_group!r} (package {_dist_name(ep)}) failed to import: {exc}"
            ) from exc
        if inspect.ismodule(obj):
            raise RegistryError(f"entry point {ep.name!r} = {ep.value!r} in group {self.entry_point_group!r} names a "
                                f"module; it must name the component itself (package.module:Class)")
        self._factories[name] = obj
        return obj

    def load_entry_points(self) -> None:
        """Import every component this registry's entry points declare (``unimoe plugins``, LightningCLI short names)."""
        for name in self._declared():
            if name not in self._factories:
                self._load(name)

    # ------------------------------------------------------------------ lookup
    def names(self) -> list[str]:
        return sorted(set(self._factories) | set(self._declared()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._factories or name in self._declared())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> Callable[..., T]:
        """Resolve a registered name or an import path to its factory."""
        if name in self._factories:
            return self._factories[name]
        if name in self._declared():
            return self._load(name)
        if "." in name or ":" in name:
            return _import_path(name, self.kind)
        raise RegistryError(
            f"unknown {self.kind} {name!r}. Registered {self.name}: "
            f"{', '.join(self.names()) or '(none)'}. "
            f"A full import path (package.module.Class) also works.{_installation_hint()}"
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


@functools.lru_cache(maxsize=4)
def _installed_entry_points(search_path: tuple[str, ...]) -> dict[str, dict[str, list[metadata.EntryPoint]]]:
    """``unimoe.*`` entry points of every installed distribution: group -> name -> entry points.

    Unlike ``importlib.metadata.entry_points()`` this keeps two packages' entry points of the
    same name (so a clash is an error instead of a silent pick); like it, a distribution
    found twice on ``sys.path`` counts once (the first one, as Python's import would).
    Read once per ``search_path`` (``sys.path``), shared by all registries.
    """
    found: dict[str, dict[str, list[metadata.EntryPoint]]] = {}
    seen: set[str] = set()
    for dist in metadata.distributions():
        key = re.sub(r"[-_.]+", "-", (dist.metadata["Name"] or "").lower())
        if key in seen:
            continue
        seen.add(key)
        for ep in dist.entry_points:
            if ep.group.startswith(ENTRY_POINT_PREFIX):
                found.setdefault(ep.group, {}).setdefault(ep.name, []).append(ep)
    return found


def _dist_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return getattr(dist, "name", None) or "?"


def _installation_hint() -> str:
    """Why in-tree names can be missing: unimoe itself is not installed, or its metadata is older than the code."""
    try:
        declared = [ep for ep in metadata.distribution("unimoe").entry_points if ep.group.startswith(ENTRY_POINT_PREFIX)]
    except metadata.PackageNotFoundError:
        return (" unimoe's own components are entry points of the installed package, and unimoe is not installed "
                "here: run `pip install -e .` in the source tree (scripts/setup.sh does).")
    if not declared:
        return (" The installed unimoe metadata declares no components (installed from an older pyproject.toml?): "
                "run `pip install -e .` again (scripts/setup.sh does when pyproject.toml changes).")
    return ""


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
GENERATION_PRESETS: Registry = Registry("generation_presets", "generation preset")
"""Named sampling defaults (``unimoe generate --preset``): functions returning GenerationSettings fields."""
STAGES: Registry = Registry("stages", "training stage")
DATA_MODULES: Registry = Registry("data_modules", "data module")
CALLBACKS: Registry = Registry("callbacks", "training callback")
STRATEGIES: Registry = Registry("strategies", "training strategy")
"""Lightning strategies unimoe adds (``strategy: {class_path: MoEParallelStrategy, ...}``)."""
LIGHTNING_REGISTRIES: tuple[Registry, ...] = (STAGES, DATA_MODULES, CALLBACKS, STRATEGIES)
"""Classes recipes name by their short class name (``class_path: JointStage``); LightningCLI
resolves those among imported classes, so the CLI imports these groups before it parses
(entry-point name = class name)."""

ALL_REGISTRIES: tuple[Registry, ...] = (
    ROUTERS, EXPERTS, CODECS, METRICS, TASKS, VISION_ENCODERS, TEXT_TOKENIZERS, SCORERS, GENERATION_PRESETS,
    *LIGHTNING_REGISTRIES,
)


def load_all_plugins() -> None:
    """Import every declared component of every registry (``unimoe plugins`` lists them)."""
    for registry in ALL_REGISTRIES:
        registry.load_entry_points()


def load_lightning_classes() -> None:
    """Import the stages, data modules, callbacks and strategies (in-tree and plug-in) so YAML can name them by class name."""
    for registry in LIGHTNING_REGISTRIES:
        registry.load_entry_points()
