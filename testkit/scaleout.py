"""The scaled-out state for tests and benchmarks: PostgreSQL databases and an MLflow tracking server.

- :func:`postgres_databases` creates fresh databases on a PostgreSQL server (``TEST_POSTGRES_URL``,
  default ``postgresql://root@127.0.0.1:5432/test``) and drops them afterwards;
- :class:`MlflowServer` runs ``mlflow server`` on one of them with a proxied artifact store
  (``--serve-artifacts --artifacts-destination DIR``) on a free loopback port;
- :func:`served_versions` reads, from a replica's ``/metrics``, the model version each of its
  API workers serves (one gauge per worker process).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from testkit.server import PROJECT_ROOT, ServerProcess, free_port

PG_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")
# No usage reports leave a test or benchmark machine.
QUIET_MLFLOW = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def postgres_error(url: str = PG_URL) -> str | None:
    """None if PostgreSQL answers at ``url``, else why not."""
    import sqlalchemy as sa

    engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return None
    except Exception as e:  # noqa: BLE001 - any failure means "no usable server"
        return f"{type(e).__name__}: {e}".splitlines()[0]
    finally:
        engine.dispose()


def with_password(url: str, password: str) -> str:
    """``url`` with a password in it (a server with trust authentication ignores it: a test secret)."""
    import sqlalchemy as sa

    return sa.make_url(url).set(password=password).render_as_string(hide_password=False)


@contextmanager
def postgres_databases(*purposes: str, admin_url: str = PG_URL) -> Iterator[dict[str, str]]:
    """One new, empty database per purpose (``{purpose: url}``), dropped on exit."""
    import sqlalchemy as sa

    tag = uuid.uuid4().hex[:10]
    names = {p: f"infantino_{p}_{tag}" for p in purposes}
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for name in names.values():
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        base = sa.make_url(admin_url)
        yield {p: base.set(database=name).render_as_string(hide_password=False) for p, name in names.items()}
    finally:
        with engine.connect() as conn:
            for name in names.values():
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


class MlflowServer(ServerProcess):
    """``mlflow server`` on ``backend_uri`` (any SQLAlchemy URL), artifacts proxied into ``artifacts_dir``."""

    def __init__(self, backend_uri: str, artifacts_dir: str | Path, port: int | None = None, log_path: str | Path | None = None,
                 workers: int = 1):
        self.backend_uri = backend_uri
        self.artifacts_dir = Path(artifacts_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else None
        self.workers = workers
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180) -> "MlflowServer":
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # The backend URI goes through the environment (MLflow's own variable), not the command line.
        env.update(QUIET_MLFLOW, MLFLOW_BACKEND_STORE_URI=self.backend_uri)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--serve-artifacts", "--artifacts-destination", str(self.artifacts_dir),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers)],
            cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"mlflow server not ready after {timeout_s}s; see {self.log_path}")

    def tracking_uri(self, user: str | None = None, password: str | None = None) -> str:
        """The server's tracking URI, with credentials in it if given (MLflow sends them as basic auth)."""
        return self.url if user is None else f"http://{user}:{password}@127.0.0.1:{self.port}"



_SERVED = re.compile(r'^infantino_served_model_version\{([^}]*)\} (\S+)$', re.MULTILINE)


def served_versions(metrics_text: str, task: str = "expression", kind: str = "head") -> dict[str, str]:
    """``{worker pid: version}`` of what each API worker of one replica serves, from its /metrics."""
    out = {}
    for labels, value in _SERVED.findall(metrics_text):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if found.get("task") == task and found.get("kind") == kind:
            out[found.get("pid", "?")] = str(int(float(value)))
    return out
