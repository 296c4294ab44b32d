"""Sustained acknowledged feedback per second (durable writes), over HTTP.

    .venv/bin/python -m bench.feedback_ingest          # ~1 minute

A real `bentoml serve` with the shipped model; the updater is kept idle (a huge trigger) so
only ingestion is measured. Two kinds of feedback, each with 1 and 16 closed-loop clients:
by prediction_id (no image work: a read and a committed insert) and by image (decode +
embedding + committed insert). An acknowledgement is only sent after the commit
(SQLite WAL, synchronous=FULL for feedback), so every counted item is durable.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.common import bootstrap_home, write_result
from testkit.faces import draw_face, png_bytes
from testkit.server import BentoServer


def face_png() -> bytes:
    return png_bytes(draw_face(0, 96))


def run(server: BentoServer, kind: str, clients: int, seconds: float, label: str, img: bytes) -> dict:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        pids = [c.post("/predict", files={"image": ("f.png", img)}).json()["prediction_id"] for _ in range(clients)]
    stop = time.perf_counter() + seconds
    latencies: list[float] = []
    errors = 0

    def client(k: int) -> None:
        nonlocal errors
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                if kind == "prediction_id":
                    r = c.post("/feedback", json={"label": label, "prediction_id": pids[k]})
                else:
                    r = c.post("/feedback", files={"image": ("f.png", img)}, data={"label": label})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1

    with cf.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    lat = np.array(latencies) * 1000
    return {"kind": kind, "clients": clients, "acks_per_s": len(lat) / seconds, "errors": errors,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        bootstrap_home(home).check_returncode()
        env = {"INFANTINO_HOME": str(home), "INFANTINO_UPDATE_MIN_ITEMS": "100000000", "INFANTINO_UPDATE_INTERVAL_S": "100000000",
               "INFANTINO_BATCH_MAX_LATENCY_MS": "60000"}
        img = face_png()
        rows = []
        with BentoServer(env, log_path=Path(tmp) / "serve.log") as server:
            for kind in ("prediction_id", "image"):
                for clients in (1, 16):
                    rows.append(run(server, kind, clients, args.seconds, "happy", img))
                    print(rows[-1], flush=True)
            with httpx.Client(base_url=server.url) as c:
                stored = c.get("/model").json()["queue"]
    acked = sum(r["acks_per_s"] * args.seconds for r in rows)
    path = write_result("feedback_ingest", {"command": "python -m bench.feedback_ingest " + " ".join(sys.argv[1:]),
                                             "seconds_per_level": args.seconds, "levels": rows, "queue_after": stored,
                                             "acknowledged": round(acked), "durability": "SQLite WAL, synchronous=FULL on feedback commits"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
