"""Start ``smtpproxy`` for the benchmark: the CLI, from this checkout.

    python bench/_smtpproxy.py run -c CONFIG     (the config's event_loop picks uvloop or asyncio)

Runs the code in this working tree whatever is installed: the repository root goes first on
``sys.path`` and, when the installed ``smtpproxy_plugins`` does not import (an editable
install of another checkout), the package is loaded from ``plugins/`` here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _use_this_checkout() -> None:
    sys.path.insert(0, str(ROOT))
    try:
        import smtpproxy_plugins  # noqa: F401
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "smtpproxy_plugins", ROOT / "plugins" / "__init__.py",
            submodule_search_locations=[str(ROOT / "plugins")])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["smtpproxy_plugins"] = module
        spec.loader.exec_module(module)


if __name__ == "__main__":
    _use_this_checkout()
    from smtpproxy.cli import main

    sys.exit(main(sys.argv[1:]))
