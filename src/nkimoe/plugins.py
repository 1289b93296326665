"""Plugin discovery and loading: builtin modules, ``nkimoe`` entry points and ``NKIMOE_PLUGINS``.

Each plugin is isolated: an import failure, a hook that raises, an invalid or duplicate
contribution is reported with the plugin's name and reason, that plugin's contributions from
that hook are dropped, and everything else loads. Loading never raises because of a plugin.

Environment:
    NKIMOE_PLUGINS          ``module[:object],...`` extra plugins to load (local modules).
    NKIMOE_DISABLE_PLUGINS  ``name,...`` plugins not to load, or ``all`` for every non-builtin one.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from nkimoe import hookspecs
from nkimoe.registry import Registry, RegistryError, reference_variant
from nkimoe.ops import OP_NAMES

ENTRY_POINT_GROUP = "nkimoe"

#: Builtin plugins, registered like any other plugin.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "nkimoe.targets_plugin",
    "nkimoe.variants.reference",
    "nkimoe.variants.norms",
    "nkimoe.variants.rope",
    "nkimoe.variants.routing",
    "nkimoe.variants.linear",
    "nkimoe.variants.experts",
    "nkimoe.variants.fused",
    "nkimoe.variants.fused_attention",
    "nkimoe.variants.attention",
)


@dataclass
class PluginInfo:
    """One plugin as loaded: where it came from, whether it works, what it contributed."""

    name: str
    source: str  #: "builtin", "entry point <dist> <version>", or "NKIMOE_PLUGINS"
    status: str = "ok"  #: "ok", "disabled", or "failed: <reason>"
    variants: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _import_object(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    obj = importlib.import_module(module_name)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


def _discover(env: Mapping[str, str]) -> list[tuple[str, str, Callable[[], Any]]]:
    """``(name, source, loader)`` for every plugin, builtins first."""
    found: list[tuple[str, str, Callable[[], Any]]] = [
        (name, "builtin", lambda name=name: importlib.import_module(name)) for name in DEFAULT_PLUGINS
    ]
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        where = f"entry point {dist.name} {dist.version}" if dist is not None else "entry point"
        found.append((ep.name, where, ep.load))
    for spec in _split(env.get("NKIMOE_PLUGINS", "")):
        found.append((spec, "NKIMOE_PLUGINS", lambda spec=spec: _import_object(spec)))
    return found


def get_plugin_manager(env: Mapping[str, str] | None = None) -> tuple[pluggy.PluginManager, list[PluginInfo]]:
    """A plugin manager with every enabled plugin registered, and a report per plugin."""
    env = os.environ if env is None else env
    disabled = set(_split(env.get("NKIMOE_DISABLE_PLUGINS", "")))
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    for name, source, load in _discover(env):
        info = PluginInfo(name, source)
        infos.append(info)
        if source != "builtin" and ("all" in disabled or name in disabled):
            info.status = "disabled by NKIMOE_DISABLE_PLUGINS"
            continue
        try:
            plugin = load()
            if pm.is_registered(plugin) or pm.has_plugin(name):
                raise RegistryError(f"plugin {name!r} is already registered")
            pm.register(plugin, name=name)
        except Exception as exc:  # isolation: a broken plugin never breaks loading
            info.status = f"failed: {type(exc).__name__}: {exc}"
    return pm, infos


def _run_hook(
    pm: pluggy.PluginManager,
    hook_name: str,
    infos: Mapping[str, PluginInfo],
    commit: Callable[[Any, str], str],
    registry: Registry,
) -> None:
    """Call ``hook_name`` on each plugin separately; commit its contributions only if all are valid."""
    hook = getattr(pm.hook, hook_name)
    for impl in hook.get_hookimpls():  # registration order: builtins first
        name = impl.plugin_name
        staged: list[Any] = []
        try:
            impl.function(register=staged.append)
        except Exception as exc:
            _fail(registry, infos[name], f"hook {hook_name} raised {type(exc).__name__}: {exc}")
            continue
        committed: list[str] = []
        try:
            for item in staged:
                committed.append(commit(item, name))
        except (RegistryError, ValueError, TypeError) as exc:
            for done in committed:  # roll back this plugin's earlier contributions
                registry.variants.pop(done, None)
                registry.targets.pop(done, None)
            _fail(registry, infos[name], str(exc))
            continue
        (infos[name].targets if hook_name == "register_targets" else infos[name].variants).extend(committed)


def _fail(registry: Registry, info: PluginInfo, reason: str) -> None:
    info.status = f"failed: {reason}"
    registry.problems.append(f"plugin {info.name!r} ({info.source}) skipped: {reason}")


def load_registry(env: Mapping[str, str] | None = None) -> Registry:
    """Load every plugin into a fresh :class:`Registry`; problems are kept in ``registry.problems``."""
    pm, infos = get_plugin_manager(env)
    registry = Registry(plugins=infos, builtin_plugins=frozenset(DEFAULT_PLUGINS))
    by_name = {info.name: info for info in infos}
    for info in infos:
        if info.status.startswith("failed"):
            registry.problems.append(f"plugin {info.name!r} ({info.source}) skipped: {info.status[8:]}")

    def add_target(target: Any, plugin: str) -> str:
        registry.add_target(target, plugin)
        return target.name

    def add_variant(variant: Any, plugin: str) -> str:
        registry.add_variant(variant, plugin)
        return variant.name

    _run_hook(pm, "register_targets", by_name, add_target, registry)
    _run_hook(pm, "register_variants", by_name, add_variant, registry)
    missing = [op for op in OP_NAMES if f"ref_{op}" not in registry.variants]
    for op in missing:  # the reference fallback must exist whatever plugins did
        registry.add_variant(reference_variant(op), "nkimoe.variants.reference")
    return registry


_DEFAULT: Registry | None = None


def get_registry(*, reload: bool = False) -> Registry:
    """The process-wide registry, loaded once from the current environment."""
    global _DEFAULT
    if _DEFAULT is None or reload:
        _DEFAULT = load_registry()
    return _DEFAULT
