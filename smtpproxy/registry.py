"""Finding, building and registering plugins.

A plugin is named in the configuration either by its entry point name (group
``smtpproxy.plugins``, how installed packages announce themselves, first-party ones
included) or by a dotted path ``package.module:Class``. A class may declare a nested
pydantic model ``Settings``; the ``settings:`` block of its configuration entry is
validated against it (errors point at the YAML line) and passed to the constructor.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import pluggy
import pydantic

from smtpproxy import hookspecs
from smtpproxy.chain import Chain, ChainStep
from smtpproxy.config import ConfigError, ConfigSource, PluginSpec, Problem, format_key
from smtpproxy.config.policies import PolicyGroup
from smtpproxy.groups import Group, Policies
from smtpproxy.settings import SettingsError
from smtpproxy.versions import PluginAPIError, check_plugin_api

__all__ = ["ENTRY_POINT_GROUP", "InstalledPlugin", "build_chain", "installed_plugins"]

ENTRY_POINT_GROUP = "smtpproxy.plugins"


@dataclass(frozen=True, slots=True)
class InstalledPlugin:
    """A plugin an installed distribution announces, for ``smtpproxy plugins``."""

    name: str
    target: str
    distribution: str | None
    hooks: tuple[str, ...]
    error: str | None = None


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def installed_plugins() -> list[InstalledPlugin]:
    """Every entry point in the plugin group, with the hooks each implements."""
    found = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else None
        try:
            target = ep.load()
            hooks = _implemented_hooks(target)
            check_plugin_api(target, ep.name)
            found.append(InstalledPlugin(ep.name, ep.value, dist, hooks))
        except PluginAPIError as exc:
            found.append(InstalledPlugin(ep.name, ep.value, dist, hooks, str(exc)))
        except Exception as exc:
            found.append(InstalledPlugin(ep.name, ep.value, dist, (), f"{type(exc).__name__}: {exc}"))
    return found


def _implemented_hooks(target: object) -> tuple[str, ...]:
    names = []
    for hook in hookspecs.HOOKS:
        attr = getattr(target, hook, None)
        if attr is not None and hasattr(attr, f"{hookspecs.PROJECT}_impl"):
            names.append(hook)
    return tuple(names)


def resolve(use: str) -> object:
    """Turn an entry point name or ``package.module:Attr`` into the class or module it names.

    Raises LookupError with a message that says what to check.
    """
    if ":" in use or "." in use:
        module_name, _, attr = use.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise LookupError(f"cannot import {module_name!r}: {exc}") from exc
        if not attr:
            return module
        try:
            obj: object = module
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            raise LookupError(f"module {module_name!r} has no attribute {attr!r}") from None
        return obj
    matches: list[EntryPoint] = list(entry_points(group=ENTRY_POINT_GROUP, name=use))
    if not matches:
        known = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
        raise LookupError(
            f"no installed plugin named {use!r} (installed: {', '.join(known) or 'none'}); "
            "install its package or give a dotted path like 'package.module:Class'"
        )
    try:
        loaded: object = matches[0].load()
    except Exception as exc:
        raise LookupError(f"plugin {use!r} ({matches[0].value}) failed to import: {exc}") from exc
    return loaded


def instantiate(
    target: object, settings: dict[str, Any], source: ConfigSource | None, index: int,
    table_names: Iterable[str] | None = None, *, where: tuple[str | int, ...] | None = None,
) -> object:
    """Build the plugin object from a class (with validated settings) or use a module as is;
    errors point at *where* (default: ``plugins[index].settings``)."""
    where = where if where is not None else ("plugins", index, "settings")
    if isinstance(target, types.ModuleType):
        if settings:
            raise ConfigError([_problem(source, where, "this plugin is a module and takes no settings")])
        return target
    if not inspect.isclass(target):
        return target  # an already-built object (a dotted path to an instance)
    factory: Callable[..., object] = target
    settings_model = getattr(target, "Settings", None)
    if settings_model is None:
        if settings:
            raise ConfigError([_problem(source, where, f"{target.__name__} takes no settings")])
        return factory()
    if not (inspect.isclass(settings_model) and issubclass(settings_model, pydantic.BaseModel)):
        raise ConfigError([_problem(source, where, f"{target.__name__}.Settings is not a pydantic model")])
    try:
        # Relative paths in a plugin's settings are relative to the configuration file.
        base_dir = Path(source.file).absolute().parent if source is not None else Path.cwd()
        # The configuration's table names, for settings of type smtpproxy.TableName.
        context: dict[str, Any] = {"base_dir": base_dir}
        if table_names is not None:
            context["tables"] = frozenset(table_names)
        validated = settings_model.model_validate(settings, context=context)
    except pydantic.ValidationError as exc:
        located = source if source is not None else ConfigSource.detached("<settings>")
        problems = located.problems_from_validation_error(exc, base=where, model=settings_model)
        raise ConfigError(problems) from None
    try:
        return factory(validated)
    except SettingsError as exc:
        raise ConfigError([_problem(source, (*where, *exc.key), exc.message)]) from None


def build_chain(
    specs: Sequence[PluginSpec], source: ConfigSource | None, *, plugin_paths: Sequence[Path] = (),
    table_names: Iterable[str] | None = None, policies: Sequence[PolicyGroup] = (),
) -> Chain:
    """Load every enabled plugin in order and return the chain; ConfigError names the entry.

    ``plugin_paths`` (the configuration's ``plugin_paths:``, absolute) are put at the front
    of ``sys.path`` first, so ``use: module:Class`` finds a module kept next to the config.
    With *policies* (the configuration's ``policies:``), each group's chain is built too and
    attached to the returned default chain (:attr:`Chain.policies`); a plugin with the same
    effective settings in two groups is one instance.
    """
    _add_import_paths(plugin_paths)
    builder = _Builder(source, table_names)
    chain = builder.chain(specs)
    groups = [(group, builder.chain(specs, group, index)) for index, group in enumerate(policies)]
    if builder.problems:
        raise ConfigError(builder.problems)
    if groups:
        chain.policies = Policies(Group.default(chain), [Group.of(g, c) for g, c in groups])
        chain.companions = tuple(c for _, c in groups)
    return chain


class _Builder:
    """Builds chains from the plugin specs, one instance per (plugin, effective settings)."""

    def __init__(self, source: ConfigSource | None, table_names: Iterable[str] | None):
        self.source = source
        self.table_names = None if table_names is None else tuple(table_names)
        self.problems: list[Problem] = []
        self.built: dict[tuple[str, str], object | None] = {}

    def chain(self, specs: Sequence[PluginSpec], group: PolicyGroup | None = None,
              group_index: int = 0) -> Chain:
        pm = new_plugin_manager()
        steps: list[ChainStep] = []
        for index, spec in enumerate(specs):
            override = group.plugins.get(spec.name) if group is not None else None
            enabled = spec.enabled if override is None or override.enabled is None else override.enabled
            if not enabled:
                continue
            settings = dict(spec.settings)
            where: tuple[str | int, ...] = ("plugins", index)
            if override is not None and override.settings:
                settings.update(override.settings)
                where = ("policies", group_index, "plugins", spec.name)
            key = (spec.name, json.dumps(settings, sort_keys=True, default=repr))
            if key not in self.built:
                self.built[key] = self._plugin(spec, settings, where, index)
            plugin = self.built[key]
            if plugin is None:
                continue
            try:
                _register(pm, plugin, spec.name)
            except pluggy.PluginValidationError as exc:  # pragma: no cover - checked when built
                self.problems.append(_problem(self.source, where, f"plugin {spec.name!r}: {exc}"))
                continue
            enforce = spec.enforce if override is None or override.enforce is None else override.enforce
            steps.append(ChainStep(spec.name, plugin, spec.timeout, spec.on_error, enforce))
        return Chain(pm, steps)

    def _plugin(self, spec: PluginSpec, settings: dict[str, Any], where: tuple[str | int, ...],
                index: int) -> object | None:
        source = self.source
        try:
            target = resolve(spec.use or spec.name)
            check_plugin_api(target, spec.name)
            plugin = instantiate(target, settings, source, index, self.table_names,
                                 where=(*where, "settings"))
            _register(new_plugin_manager(), plugin, spec.name)  # its hooks are checked once, here
            return plugin
        except ConfigError as exc:
            self.problems.extend(exc.problems)
        except (LookupError, PluginAPIError) as exc:
            key = "use" if spec.use else "name"
            self.problems.append(_problem(source, ("plugins", index, key), str(exc)))
        except (pluggy.PluginValidationError, TypeError, ValueError) as exc:
            self.problems.append(_problem(source, where, f"plugin {spec.name!r}: {exc}"))
        except Exception as exc:  # a constructor that fails otherwise (a file it reads, ...)
            why = f"plugin {spec.name!r} could not be built: {type(exc).__name__}: {exc}"
            self.problems.append(_problem(source, where, why))
        return None


def _add_import_paths(paths: Sequence[Path]) -> None:
    for path in reversed(paths):
        entry = str(path)
        if entry not in sys.path:
            sys.path.insert(0, entry)
    if paths:
        importlib.invalidate_caches()


def _register(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    pm.register(plugin, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError:
        pm.unregister(plugin)
        unknown = [
            attr for attr in dir(plugin)
            if hasattr(getattr(plugin, attr, None), f"{hookspecs.PROJECT}_impl")
            and attr not in hookspecs.HOOKS
        ]
        raise pluggy.PluginValidationError(
            plugin,
            f"unknown hook(s) {', '.join(unknown)}; known hooks are "
            f"{', '.join(hookspecs.HOOKS)}",
        ) from None
    for caller in pm.get_hookcallers(plugin) or []:
        for impl in caller.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            refused = _refused_option(impl)
            if refused is not None:
                pm.unregister(plugin)
                raise pluggy.PluginValidationError(
                    plugin, f"plugin {name!r}: hook {caller.name}: {refused}"
                )


def _refused_option(impl: pluggy.HookImpl) -> str | None:
    """Why a hookimpl option cannot be honoured, or None. Silently ignoring one would let a
    plugin author believe, say, that ``tryfirst`` runs their check before the others."""
    if impl.hookwrapper or impl.wrapper:
        return "hook wrappers are not supported; return a Verdict"
    if impl.tryfirst or impl.trylast:
        return ("tryfirst/trylast are not supported: plugins run in the order of the "
                "configuration's plugins: list")
    if impl.optionalhook:
        return "optionalhook is not supported: every hook must be one smtpproxy calls"
    return None


def _problem(source: ConfigSource | None, path: Sequence[str | int], message: str) -> Problem:
    if source is None:
        return Problem("<config>", None, None, format_key(path), message)
    line_col = source.locate(path)
    line, col = line_col if line_col else (None, None)
    return Problem(source.file, line, col, format_key(path), message)
