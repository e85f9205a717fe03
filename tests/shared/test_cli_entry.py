"""The console script on a client-only install: it names the extra to add."""

from __future__ import annotations

import subprocess
import sys

BLOCK_TYPER = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"typer", "rich"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Refuse())
from shared.cli_entry import main
main()
"""


def test_without_the_cli_extra_it_says_what_to_install():
    done = subprocess.run([sys.executable, "-c", BLOCK_TYPER], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "pip install 'llm-compare[cli]'" in done.stderr and "typer is not installed" in done.stderr


def test_with_it_the_command_runs():
    done = subprocess.run(
        [sys.executable, "-c", "from shared.cli_entry import main; main()", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "keys" in done.stdout
