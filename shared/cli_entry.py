"""The `llm-compare` console script. A plain install is the Python client alone, without the
command line's own dependencies: say which extra to add rather than fail on an import."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from shared.cli import main as run
    except ModuleNotFoundError as exc:
        sys.exit(
            f"llm-compare: the command line needs its extra ({exc.name} is not installed): "
            "pip install 'llm-compare[cli]'"
        )
    run()
