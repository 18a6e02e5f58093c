"""Keep modules that the server never uses out of its processes.

Each page that an import allocates in the parent of the workers counts in the
resident memory of every worker (see `moorage.workers`). Two packages import
much more than the server uses when their `__init__` runs:

- `sqlalchemy.ext.asyncio`, the only public module of `AsyncEngine`, imports
  SQLAlchemy's ORM for `AsyncSession`, although Moorage uses only SQLAlchemy
  Core;
- `uvicorn` imports its command line, with click, watchfiles and the
  reloading supervisors, although the server needs only `Config` and
  `Server`.

Together they took about 7.5 MiB of each worker's resident memory.
`use_lean_imports` adds an import finder that loads these packages without
running their `__init__`. The names listed in `LEAN_PACKAGES` come from the
package's modules that import none of that. The first other name that is
looked up (`AsyncSession`, `uvicorn.run`) runs the package's own `__init__`
in the same module object, so any user of the package still finds everything
it offers. `moorage.prefork` installs the finder before the server's modules
are imported; other processes (the command line, tests) import the packages
as usual.

NOTE: this depends on where these packages define the names listed below,
as of SQLAlchemy 2.1 and uvicorn 0.55. `tests/unit/test_server_imports.py`
checks them against the installed versions.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Sequence
from importlib.machinery import ModuleSpec, PathFinder
from types import ModuleType
from typing import Any

# Packages loaded without running their __init__, with the names that the
# __init__ takes from modules of theirs that the server imports anyway.
LEAN_PACKAGES: dict[str, dict[str, frozenset[str]]] = {
    # Not .session and .scoping, which import SQLAlchemy's ORM.
    "sqlalchemy.ext.asyncio": {
        "engine": frozenset(
            {
                "AsyncConnection",
                "AsyncEngine",
                "AsyncTransaction",
                "async_engine_from_config",
                "create_async_engine",
                "create_async_pool_from_url",
            }
        ),
        "result": frozenset(
            {
                "AsyncMappingResult",
                "AsyncResult",
                "AsyncScalarResult",
                "AsyncTupleResult",
            }
        ),
    },
    # Not .main, the command line, which imports click, watchfiles and the
    # reloading supervisors.
    "uvicorn": {
        "_version": frozenset({"__version__"}),
        "config": frozenset({"Config"}),
        "server": frozenset({"Server"}),
    },
}


class _LeanLoader:
    """A loader that skips a package's `__init__`. The listed names are looked
    up in the package's modules, and other names in the package once its
    `__init__` has run."""

    def __init__(self, real: ModuleSpec, names: dict[str, frozenset[str]]) -> None:
        self.real = real
        self.names = names
        self.lock = threading.RLock()

    def create_module(self, spec: ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        real = self.real
        provided = self.names

        def lookup(name: str) -> Any:
            for submodule, names in provided.items():
                if name in names:
                    found = importlib.import_module(f"{module.__name__}.{submodule}")
                    value = getattr(found, name)
                    setattr(module, name, value)
                    return value
            if name.startswith("__"):
                raise AttributeError(name)
            if PathFinder.find_spec(f"{module.__name__}.{name}", module.__path__):
                # A submodule, which the import system loads when this fails.
                raise AttributeError(name)
            # A name only the full package has: run its __init__ in this
            # module, which then contains every name, as after a plain import.
            # The lock keeps two threads from running it at once.
            with self.lock:
                if "__getattr__" in vars(module):
                    del module.__getattr__
                    assert real.loader is not None
                    real.loader.exec_module(module)
            return getattr(module, name)

        module.__getattr__ = lookup  # type: ignore[method-assign]


class _LeanFinder:
    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        names = LEAN_PACKAGES.get(fullname)
        if names is None:
            return None
        real = PathFinder.find_spec(fullname, path)
        if real is None or real.loader is None or not real.submodule_search_locations:
            return real
        # Not importlib.util or importlib.abc: they import tempfile and shutil.
        spec = ModuleSpec(
            fullname,
            _LeanLoader(real, names),  # type: ignore[arg-type]
            origin=real.origin,
            is_package=True,
        )
        spec.submodule_search_locations = real.submodule_search_locations
        spec.has_location = real.has_location
        return spec


def use_lean_imports() -> None:
    """Install the finder, which affects only packages not imported yet."""
    if not any(isinstance(finder, _LeanFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _LeanFinder())
