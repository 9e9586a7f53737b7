"""Domain packages that extend the engine, found through the ``specialize.plugins`` entry points.

A distribution declares its plugins in ``pyproject.toml``::

    [project.entry-points."specialize.plugins"]
    code_qwen = "code_qwen"

Importing a plugin module is all it takes: the module registers what it provides (tasks, ...) with
the engine's registries at import time. The engine reaches domain packages only through here, so
it never names them and the dependency keeps pointing domain → engine.
"""

from __future__ import annotations

import importlib.metadata

GROUP = "specialize.plugins"

# Names of the entry points already imported. Python caches the modules themselves; this only
# spares re-reading distribution metadata on every registry look-up.
_loaded: set[str] = set()


class PluginError(ImportError):
    """A declared plugin could not be imported. The message names the entry point."""


def plugin_entry_points() -> list[importlib.metadata.EntryPoint]:
    """The installed entry points of the ``specialize.plugins`` group, one per name, sorted."""
    unique: dict[str, importlib.metadata.EntryPoint] = {}
    # A project installed in editable mode can be seen twice (its source tree's egg-info and the
    # installed dist-info); the first one found wins, as it does for imports.
    for ep in importlib.metadata.entry_points(group=GROUP):
        unique.setdefault(ep.name, ep)
    return [unique[name] for name in sorted(unique)]


def load_plugins() -> list[str]:
    """Import every installed plugin once and return the names of all loaded plugins.

    Safe to call any number of times. A plugin that fails to import raises ``PluginError``
    instead of being skipped: a silently missing plugin would show up later as a confusing
    "unknown task" error.
    """
    for ep in plugin_entry_points():
        if ep.name in _loaded:
            continue
        try:
            ep.load()
        except Exception as e:
            raise PluginError(
                f"plugin {ep.name!r} ({ep.value}, entry point group {GROUP!r}) failed to import: "
                f"{type(e).__name__}: {e}"
            ) from e
        _loaded.add(ep.name)
    return sorted(_loaded)
