"""Load across replicas: two `bentoml serve` replicas sharing PostgreSQL and an MLflow tracking server.

    .venv/bin/python -m bench.replicas                      # start-up (~2 min) + 20 s of load
    .venv/bin/python -m bench.replicas --seconds 60 --clients 16 --workers 2

What it sets up is what tests/test_scaleout.py sets up and what deploy/ describes: fresh
PostgreSQL databases (``TEST_POSTGRES_URL``, default ``postgresql://root@127.0.0.1:5432/test``;
dropped at the end), ``mlflow server`` on one of them with a proxied artifact store, the shipped
model registered into it (``infantino bootstrap``), and two replicas on loopback ports, each with
its own empty INFANTINO_HOME and BENTOML_HOME: all they share is PostgreSQL and MLflow.

Load: --clients threads (16), half on each replica, for --seconds. Each client loops over
POST /predict (a FER2013 face from ../shared/data when present, else a drawn face) and, for every
--feedback-every-th answer, POST /feedback with the face's true label *at the other replica* by
``prediction_id`` (the prediction log is shared). Every --update-items feedback items trigger an
online update somewhere (one at a time: the lease). Meanwhile the registry's champion alias is
polled every 0.1 s and both replicas' /metrics every 0.25 s: for each new champion, the time until
each replica first answers with it and until every worker of both serves it. If no update was
promoted by mid-run (the gate may refuse candidates), the bench promotes the newest refused
candidate itself as soon as there is one (during the load, or after it if none came), so the
propagation time is always measured (marked ``"by": "bench, ..."``).

Writes bench/results/replicas.json. Needs PostgreSQL; runs on CPU.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.common import DATA, FER_CLASSES, write_result
from testkit.faces import draw_face
from testkit.scaleout import PG_URL, QUIET_MLFLOW, MlflowServer, postgres_databases, postgres_error, served_versions
from testkit.server import BentoServer

ROOT = Path(__file__).resolve().parents[1]


def face_pool(n: int, seed: int) -> tuple[list[tuple[bytes, str]], str]:
    """n (PNG bytes, true label) faces: FER2013 when the data set is there, else drawn ones."""
    rng = np.random.default_rng(seed)
    npz = DATA / "fer2013_train.npz"
    out = []
    if npz.exists():
        with np.load(npz) as d:
            for i in rng.choice(len(d["y"]), n, replace=False):
                buf = io.BytesIO()
                Image.fromarray(d["x"][i]).save(buf, "PNG")
                out.append((buf.getvalue(), FER_CLASSES[int(d["y"][i])]))
        return out, f"FER2013 faces from {npz.name}"
    for i in range(n):
        label = i % 3  # the drawn mouths: happy, sad, surprise
        buf = io.BytesIO()
        draw_face(label, 48, rng).save(buf, "PNG")
        out.append((buf.getvalue(), ("happy", "sad", "surprise")[label]))
    return out, "drawn faces (no FER2013 data found)"


class Recorder:
    """Thread-safe tallies of requests, errors, latencies and which head version each replica answered with."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.count: dict[str, int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.error_examples: list[str] = []
        self.first_answer: dict[tuple[str, str], float] = {}  # (replica, head version) -> first time seen

    def ok(self, what: str, replica: str, seconds: float, head_version: str | None = None) -> None:
        with self.lock:
            self.latency[what].append(seconds)
            self.count[f"{what}@{replica}"] += 1
            if head_version is not None:
                self.first_answer.setdefault((replica, head_version), time.monotonic())

    def error(self, what: str, replica: str, detail: str) -> None:
        with self.lock:
            self.errors[f"{what}@{replica}"] += 1
            if len(self.error_examples) < 10:
                self.error_examples.append(f"{what}@{replica}: {detail[:200]}")


def client_loop(i: int, replicas: dict[str, str], pool: list[tuple[bytes, str]], rec: Recorder, stop: threading.Event,
                feedback_every: int) -> None:
    names = sorted(replicas)
    here, there = names[i % 2], names[(i + 1) % 2]
    rng = random.Random(i)
    n = 0
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            img, label = pool[rng.randrange(len(pool))]
            t = time.perf_counter()
            try:
                r = c.post(f"{replicas[here]}/predict", files={"image": ("f.png", img, "image/png")})
                if r.status_code != 200:
                    rec.error("predict", here, f"{r.status_code} {r.text}")
                    continue
                answer = r.json()
                rec.ok("predict", here, time.perf_counter() - t, answer["head_version"])
            except httpx.HTTPError as exc:
                rec.error("predict", here, repr(exc))
                continue
            n += 1
            if n % feedback_every:
                continue
            t = time.perf_counter()
            try:  # corrected at the other replica: the prediction log is shared
                r = c.post(f"{replicas[there]}/feedback", json={"label": label, "prediction_id": answer["prediction_id"]})
                if r.status_code == 200:
                    rec.ok("feedback", there, time.perf_counter() - t)
                else:
                    rec.error("feedback", there, f"{r.status_code} {r.text}")
            except httpx.HTTPError as exc:
                rec.error("feedback", there, repr(exc))


def watch(tracking_uri: str, home: Path, replicas: dict[str, str], workers: int, stop: threading.Event,
          alias_moves: list[dict], all_served: dict[str, float]) -> None:
    """Poll the champion alias (0.1 s) and every worker's served version (0.25 s)."""
    from infantino.settings import Settings
    from registry.store import ModelRegistry

    registry = ModelRegistry(Settings(home=home), tracking_uri=tracking_uri)
    current = registry.champion_version("head")
    last_metrics = 0.0
    while not stop.is_set():
        now = registry.champion_version("head")
        if now != current:
            alias_moves.append({"version": now, "at": time.monotonic()})
            current = now
        if time.monotonic() - last_metrics > 0.25:
            last_metrics = time.monotonic()
            for version in {m["version"] for m in alias_moves} - set(all_served):
                seen = []
                for url in replicas.values():
                    try:
                        seen.append(served_versions(httpx.get(f"{url}/metrics", timeout=10).text))
                    except httpx.HTTPError:
                        seen.append({})
                if all(len(s) == workers and set(s.values()) == {version} for s in seen):
                    all_served[version] = time.monotonic()
        time.sleep(0.1)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1, help="API workers per replica")
    ap.add_argument("--feedback-every", type=int, default=4, help="one feedback per this many predictions (per client)")
    ap.add_argument("--update-items", type=int, default=32, help="INFANTINO_UPDATE_MIN_ITEMS of the replicas")
    ap.add_argument("--poll-s", type=float, default=1.0, help="INFANTINO_MODEL_POLL_S of the replicas")
    ap.add_argument("--note", default="", help="recorded with the result (e.g. what else ran on the machine)")
    ap.add_argument("--no-write", action="store_true", help="print the result, do not write bench/results/replicas.json")
    args = ap.parse_args()

    error = postgres_error()
    if error:
        sys.exit(f"PostgreSQL at {PG_URL} is not reachable ({error}); set TEST_POSTGRES_URL")
    pool, pool_kind = face_pool(400, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="infantino-replicas-"))
    print(f"work folder {tmp}", flush=True)
    with postgres_databases("mlflow", "queue") as db, MlflowServer(db["mlflow"], tmp / "artifacts", log_path=tmp / "mlflow.log") as ml:
        t0 = time.perf_counter()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("INFANTINO_", "MLFLOW_"))}
        out = subprocess.run([sys.executable, "-m", "cli.main", "bootstrap"], cwd=ROOT, capture_output=True, text=True,
                             env={**env, **QUIET_MLFLOW, "INFANTINO_HOME": str(tmp / "bootstrap-home"), "MLFLOW_TRACKING_URI": ml.url})
        if out.returncode != 0:
            sys.exit(f"infantino bootstrap failed:\n{out.stderr[-3000:]}")
        print(out.stdout.strip(), flush=True)
        common = {**QUIET_MLFLOW, "MLFLOW_TRACKING_URI": ml.url, "INFANTINO_QUEUE_URL": db["queue"],
                  "INFANTINO_MODEL_POLL_S": str(args.poll_s), "INFANTINO_UPDATE_MIN_ITEMS": str(args.update_items),
                  "INFANTINO_API_WORKERS": str(args.workers), "INFANTINO_FACE_DETECTOR": "none",
                  "INFANTINO_BATCH_MAX_LATENCY_MS": "60000"}
        servers = {}
        for name in ("a", "b"):
            s = BentoServer({**common, "INFANTINO_HOME": str(tmp / f"home-{name}"), "BENTOML_HOME": str(tmp / f"bentoml-{name}")},
                            log_path=tmp / f"replica-{name}.log")
            for key in list(s.env):
                if key.startswith(("INFANTINO_", "MLFLOW_")) and key not in common and key != "INFANTINO_HOME":
                    del s.env[key]
            servers[name] = s
        try:
            threads = [threading.Thread(target=s.start, kwargs={"timeout_s": 600}) for s in servers.values()]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for s in servers.values():
                s.wait_ready(60)
            setup_s = time.perf_counter() - t0
            print(f"set up in {setup_s:.0f} s: MLflow {ml.url}, replicas " + ", ".join(s.url for s in servers.values()), flush=True)
            replicas = {name: s.url for name, s in servers.items()}
            for url in replicas.values():  # one warm-up answer each (first ONNX runs are slow)
                httpx.post(f"{url}/predict", files={"image": ("f.png", pool[0][0], "image/png")}, timeout=120)
            from infantino.settings import Settings
            from registry.store import ModelRegistry

            registry = ModelRegistry(Settings(home=tmp / "bench-home"), tracking_uri=ml.url)
            first_champion = registry.champion_version("head")

            rec, stop_load, stop_watch, alias_moves, all_served = Recorder(), threading.Event(), threading.Event(), [], {}
            watcher = threading.Thread(target=watch, args=(ml.url, tmp / "watch-home", replicas, args.workers, stop_watch,
                                                           alias_moves, all_served), daemon=True)
            watcher.start()
            clients = [threading.Thread(target=client_loop, args=(i, replicas, pool, rec, stop_load, args.feedback_every))
                       for i in range(args.clients)]
            forced: dict = {}

            def promote_a_refused_candidate(during_load: bool) -> None:
                """If no update was promoted, make the newest (refused) candidate champion: propagation is what is measured."""
                if forced or alias_moves:
                    return
                newest = registry.list_versions("head")[-1]
                if newest["version"] != first_champion and "champion" not in newest["aliases"]:
                    registry.promote("head", newest["version"])
                    forced.update(version=newest["version"], during_load=during_load)

            started, started_wall = time.monotonic(), time.time()
            for t in clients:
                t.start()
            while time.monotonic() - started < args.seconds:
                time.sleep(0.2)
                if time.monotonic() - started >= args.seconds / 2:
                    promote_a_refused_candidate(during_load=True)
            stop_load.set()
            elapsed = time.monotonic() - started
            for t in clients:
                t.join()
            # After the load: wait (up to 120 s) for a candidate if none came, and for every promotion to reach
            # everyone; probe each replica's answers meanwhile (the clients have stopped).
            deadline = time.monotonic() + 120
            with httpx.Client(timeout=60) as probe:
                while time.monotonic() < deadline:
                    promote_a_refused_candidate(during_load=False)
                    pending = [m["version"] for m in alias_moves if m["version"] not in all_served
                               or any((name, m["version"]) not in rec.first_answer for name in replicas)]
                    if alias_moves and not pending:
                        break
                    for version in pending:
                        for name, url in replicas.items():
                            if (name, version) not in rec.first_answer:
                                r = probe.post(f"{url}/predict", files={"image": ("f.png", pool[0][0], "image/png")})
                                if r.status_code == 200:
                                    rec.first_answer.setdefault((name, r.json()["head_version"]), time.monotonic())
                    time.sleep(0.1)
            stop_watch.set()
            watcher.join(5)

            versions = registry.list_versions("head")
            events = []
            for m in alias_moves:
                v = m["version"]
                info = next((x for x in versions if x["version"] == v), {"tags": {}})
                events.append({
                    "version": v, "by": "gate" if forced.get("version") != v else
                    ("bench, during the load" if forced["during_load"] else "bench, after the load (no candidate came during it)"),
                    "gate": info["tags"].get("gate", ""),
                    **{f"first_answer_{name}_s": (rec.first_answer[(name, v)] - m["at"]) if (name, v) in rec.first_answer else None
                       for name in replicas},
                    "every_worker_of_both_s": (all_served[v] - m["at"]) if v in all_served else None,
                })
            n_pred = sum(v for k, v in rec.count.items() if k.startswith("predict@"))
            n_fb = sum(v for k, v in rec.count.items() if k.startswith("feedback@"))
            result = {
                "command": "python -m bench.replicas " + " ".join(sys.argv[1:]),
                "note": args.note,
                "setup": {"replicas": 2, "api_workers_per_replica": args.workers, "clients": args.clients,
                          "seconds": round(elapsed, 1), "feedback_every": args.feedback_every, "update_min_items": args.update_items,
                          "model_poll_s": args.poll_s, "model": out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "",
                          "images": pool_kind, "setup_seconds": round(setup_s, 1),
                          "state": "PostgreSQL 127.0.0.1:5432 (feedback store, prediction log, lease; MLflow backend), "
                                   "mlflow server --serve-artifacts on loopback"},
                "throughput": {"predict_per_s": n_pred / elapsed, "feedback_per_s": n_fb / elapsed,
                               "requests_per_s": (n_pred + n_fb) / elapsed},
                "requests": dict(rec.count), "errors": dict(rec.errors), "error_examples": rec.error_examples,
                "latency_ms": {what: {"p50": percentile(v, 50) * 1000, "p99": percentile(v, 99) * 1000, "n": len(v)}
                               for what, v in rec.latency.items() if v},
                "updates": {"head_versions_registered": len(versions) - 1,
                            "versions": [{"version": x["version"], "aliases": x["aliases"], "gate": x["tags"].get("gate", ""),
                                          "registered_s_after_load_start": round(x["created"] / 1000 - started_wall, 2)}
                                         for x in versions[1:]]},
                "new_champions": events,
            }
        finally:
            for s in servers.values():
                s.stop()
    import json

    print(json.dumps(result, indent=2))
    if not args.no_write:
        print(f"wrote {write_result('replicas', result)}")


if __name__ == "__main__":
    main()
