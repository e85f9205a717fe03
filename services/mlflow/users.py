"""Give the workers their own MLflow account on a server running the basic-auth app.

Compose runs this once per start (service `mlflow-users`), after the server is healthy: it logs
in as the admin MLflow created on first start and creates the workers' user, or sets its
password again when it exists, so changing MLFLOW_WORKER_PASSWORD in .env and restarting is how
it is rotated. The workers own the experiments they create (MLflow grants MANAGE to a creator);
with ``default_permission = NO_PERMISSIONS`` nobody else reads them unless an admin grants it.

    MLFLOW_URL=http://mlflow:5000 MLFLOW_AUTH_ADMIN_PASSWORD=… MLFLOW_WORKER_PASSWORD=… \\
        python users.py
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request


def call(url: str, path: str, body: dict[str, str], *, user: str, password: str, method: str = "POST") -> int:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(
        f"{url}/api/2.0{path}",
        data=json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        if exc.code == 400 and b"RESOURCE_ALREADY_EXISTS" in exc.read():
            return 409
        raise


def ensure_user(url: str, *, admin: str, admin_password: str, user: str, password: str) -> str:
    credentials = {"username": user, "password": password}
    status = call(url, "/mlflow/users/create", credentials, user=admin, password=admin_password)
    if status == 409:
        call(
            url,
            "/mlflow/users/update-password",
            credentials,
            user=admin,
            password=admin_password,
            method="PATCH",
        )
        return "updated"
    return "created"


def main() -> int:
    url = os.environ.get("MLFLOW_URL", "http://mlflow:5000").rstrip("/")
    admin = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
    admin_password = os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"]
    user = os.environ.get("MLFLOW_WORKER_USERNAME", "llm-compare")
    password = os.environ["MLFLOW_WORKER_PASSWORD"]
    # Compose starts this once the server reports healthy, but its workers may still be warming up.
    deadline = time.monotonic() + float(os.environ.get("MLFLOW_WAIT_S", "120"))
    while True:
        try:
            outcome = ensure_user(
                url, admin=admin, admin_password=admin_password, user=user, password=password
            )
        except (urllib.error.URLError, ConnectionError) as exc:
            if time.monotonic() > deadline:
                print(f"MLflow at {url} did not answer: {exc}", file=sys.stderr)
                return 1
            time.sleep(2)
            continue
        print(f"MLflow user {user!r} {outcome}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
