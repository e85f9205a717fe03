"""The I/O workers' app stays light: importing it and every task module it runs loads no torch,
transformers or mlflow, so its image needs none of them (services/worker/io.Dockerfile)."""

from __future__ import annotations

import subprocess
import sys

from shared.tasks import DELIVER_WEBHOOK, GENERATE_REMOTE


def test_io_app_and_its_tasks_do_not_import_torch_transformers_or_mlflow():
    code = (
        "import sys; from services.worker.io_app import app; app.loader.import_default_modules(); "
        "print(sorted(n for n in app.tasks if not n.startswith('celery.'))); "
        "print([m for m in ('torch', 'transformers', 'mlflow', 'pandas') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    tasks, heavy = out.stdout.strip().splitlines()
    assert GENERATE_REMOTE in tasks
    assert DELIVER_WEBHOOK in tasks
    assert heavy == "[]"
