"""/predict and /feedback together: 16 concurrent clients for 60 s against one real `bentoml serve`.

    .venv/bin/python -m bench.mixed_load                      # ~2.5 minutes: 60 s mixed + 20 s feedback alone + start-up
    .venv/bin/python -m bench.mixed_load --seconds 20 --clients 8 --alone-seconds 0

The shipped model (``infantino bootstrap`` into a temporary INFANTINO_HOME) behind ``bentoml serve``
(testkit.server.BentoServer with STILL_MODEL_ENV: no online update runs, so only serving and
ingestion are measured). The load generator is locust (headless, in a subprocess, with
bench/mixed_load_locustfile.py): closed-loop clients, each on one keep-alive connection.
Of --clients (default 16), 3/4 POST /predict (a 640x480 JPEG face photo, bench.serve.make_photos)
and 1/4 POST /feedback with an idempotency key: half naming a prediction_id taken from the
/predict answers, half with a photo (decode + embedding + durable insert).

Then (--alone-seconds, default 20; 0 skips) the same feedback clients run with no /predict load,
on the same server, as the baseline next to bench/results/feedback_ingest.json's rates.

Per endpoint: requests, throughput/s, p50/p99 ms, 2xx/4xx/5xx and connection failures (goal: zero
5xx). Any 5xx is written out in full (bodies, and the server log lines that mention errors).
Writes bench/results/mixed_load.json (bench.common.write_result) and bench/results/mixed_load.png
(throughput and latency over time per endpoint). The clients run on the same machine as the server
and take some of its CPU (the JSON records locust's CPU seconds and the load average).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.common import RESULTS, bootstrap_home, write_result
from bench.serve import make_photos
from testkit.server import STILL_MODEL_ENV, BentoServer

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "mixed_load_locustfile.py"
ENDPOINTS = ("/predict", "/feedback (prediction_id)", "/feedback (image)")
FEEDBACK = ENDPOINTS[1:]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def split_clients(n: int) -> tuple[int, int, int]:
    """(predict, feedback by id, feedback with image): 3/4 predict, the rest feedback split in half."""
    feedback = max(2, round(n / 4)) if n >= 4 else max(1, n // 2)
    predict = n - feedback
    return predict, feedback - feedback // 2, feedback // 2


def run_locust(url: str, work: Path, tag: str, counts: tuple[int, int, int], seconds: float) -> dict:
    """One headless locust run; returns its request log rows, failures, locust's own stats and CPU time."""
    classes = [c for c, k in zip(("PredictUser", "FeedbackByIdUser", "FeedbackImageUser"), counts) if k]
    users = sum(counts)
    env = {**os.environ, "MIXED_PHOTOS": str(work / "photos"), "MIXED_LOG": str(work / f"{tag}_requests.csv"),
           "MIXED_ERRORS": str(work / f"{tag}_errors.jsonl"), "MIXED_PREDICT": str(counts[0]),
           "MIXED_FEEDBACK_ID": str(counts[1]), "MIXED_FEEDBACK_IMAGE": str(counts[2])}
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
           "-u", str(users), "-r", str(users), "-t", f"{seconds:g}s", "--stop-timeout", "60",
           "--csv", str(work / tag), "--only-summary", "--loglevel", "WARNING", *classes]
    log(f"[{tag}] locust: {users} clients ({counts[0]} predict, {counts[1]} feedback by id, {counts[2]} feedback by image) "
        f"for {seconds:g} s")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)  # exit 1: failures, counted below
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (work / f"{tag}_locust.log").write_text(proc.stdout + proc.stderr)
    rows = []
    with open(work / f"{tag}_requests.csv") as f:
        for r in csv.DictReader(f):
            rows.append((float(r["start"]), r["name"], int(r["status"]), float(r["ms"])))
    errors = [json.loads(line) for line in (work / f"{tag}_errors.jsonl").read_text().splitlines() if line.strip()]
    # (locust's own --csv stats file is written periodically and can miss the last second: the counts here come
    # from the per-request log, which matches the summary locust prints at the end, kept in <tag>_locust.log)
    return {"rows": rows, "errors": errors, "locust_exit_code": proc.returncode,
            "locust_wall_s": round(wall, 1),
            "locust_cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
            "locust_stderr_tail": (proc.stderr.strip().splitlines() or [""])[-15:]}


def summarise(rows: list) -> tuple[dict, float, float]:
    """Per endpoint: requests, ok/s, p50/p99 (all answers), status classes.

    The window runs from the first request's start to the last answer (about --seconds)."""
    t0 = min(r[0] for r in rows)
    seconds = max(r[0] + r[3] / 1000 for r in rows) - t0
    out = {}
    for name in ENDPOINTS:
        mine = [r for r in rows if r[1] == name]
        if not mine:
            continue
        status = np.array([r[2] for r in mine])
        ms = np.array([r[3] for r in mine])
        ok = int(((status >= 200) & (status < 300)).sum())
        out[name] = {"requests": len(mine), "ok": ok, "throughput_per_s": round(ok / seconds, 1),
                     "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
                     "max_ms": round(float(ms.max()), 1),
                     "4xx": int(((status >= 400) & (status < 500)).sum()), "5xx": int((status >= 500).sum()),
                     "connection_failures": int((status == 0).sum()),
                     "status_counts": {str(s): int((status == s).sum()) for s in sorted(set(status.tolist()))}}
    fb = [r for r in rows if r[1] in FEEDBACK]
    if fb:
        ok = sum(1 for r in fb if 200 <= r[2] < 300)
        out["/feedback (all)"] = {"requests": len(fb), "ok": ok, "throughput_per_s": round(ok / seconds, 1),
                                  "p50_ms": round(float(np.percentile([r[3] for r in fb], 50)), 1),
                                  "p99_ms": round(float(np.percentile([r[3] for r in fb], 99)), 1),
                                  "4xx": sum(1 for r in fb if 400 <= r[2] < 500), "5xx": sum(1 for r in fb if r[2] >= 500),
                                  "connection_failures": sum(1 for r in fb if r[2] == 0)}
    return out, t0, seconds


def time_series(rows: list, t0: float, seconds: float, step: float) -> dict:
    """Per endpoint and time bin (by completion time): answered/s, p50 and p99 ms."""
    edges = np.arange(0, seconds + step, step)
    out = {"bin_s": step, "t_s": (edges[:-1] + step / 2).round(2).tolist()}
    for name in ENDPOINTS:
        done = np.array([r[0] - t0 + r[3] / 1000 for r in rows if r[1] == name])
        ms = np.array([r[3] for r in rows if r[1] == name])
        if not len(done):
            continue
        idx = np.digitize(done, edges) - 1
        per = {"per_s": [], "p50_ms": [], "p99_ms": []}
        for b in range(len(edges) - 1):
            sel = ms[idx == b]
            per["per_s"].append(round(len(sel) / step, 2))
            per["p50_ms"].append(round(float(np.percentile(sel, 50)), 1) if len(sel) else None)
            per["p99_ms"].append(round(float(np.percentile(sel, 99)), 1) if len(sel) else None)
        out[name] = per
    return out


def plot(series: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    t = np.array(series["t_s"])
    colours = dict(zip(ENDPOINTS, ("tab:blue", "tab:orange", "tab:green")))
    for name in ENDPOINTS:
        if name not in series:
            continue
        s = series[name]
        ax1.plot(t, s["per_s"], color=colours[name], label=name)
        p50 = np.array([np.nan if v is None else v for v in s["p50_ms"]])
        p99 = np.array([np.nan if v is None else v for v in s["p99_ms"]])
        ax2.plot(t, p50, color=colours[name], label=f"{name} p50")
        ax2.plot(t, p99, color=colours[name], ls="--", alpha=0.7, label=f"{name} p99")
    ax1.set_ylabel(f"answered / s ({series['bin_s']:g} s bins)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.set_yscale("log")
    ax2.set_ylabel("latency ms (log)")
    ax2.set_xlabel("seconds since the first request")
    ax2.legend(fontsize=7, ncol=3)
    ax2.grid(alpha=0.3, which="both")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def server_error_lines(log_path: Path, limit: int = 60) -> list[str]:
    keys = ("Traceback", "ERROR", "Exception", "| 500 |", " 500 ", " 502 ", " 503 ", " 504 ", "status=5")
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    return [ln for ln in lines if any(k in ln for k in keys)][:limit]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60, help="length of the mixed run (default 60)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients: 3/4 /predict, 1/4 /feedback (default 16)")
    ap.add_argument("--alone-seconds", type=float, default=20,
                    help="then the feedback clients alone, as a baseline on the same server (default 20; 0 skips)")
    ap.add_argument("--images", type=int, default=8, help="distinct test photos (default 8)")
    ap.add_argument("--out", default="mixed_load", help="result name under bench/results/ (default mixed_load)")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary folder (server and locust logs)")
    args = ap.parse_args()
    counts = split_clients(args.clients)
    started = time.time()
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="infantino-bench-mixed-"))
    (work / "photos").mkdir()
    photos = make_photos(args.images)
    for i, p in enumerate(photos):
        (work / "photos" / f"{i}.jpg").write_bytes(p)
    home = work / "home"
    log(f"[model] infantino bootstrap (INFANTINO_HOME={home})")
    bootstrap_home(home).check_returncode()
    server_log = work / "serve.log"
    env = {**STILL_MODEL_ENV, "INFANTINO_HOME": str(home)}
    result: dict = {
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT), "-m", "bench.mixed_load", *sys.argv[1:]]),
        "settings": {"seconds": args.seconds, "clients": args.clients,
                     "clients_split": dict(zip(("predict", "feedback_prediction_id", "feedback_image"), counts)),
                     "alone_seconds": args.alone_seconds,
                     "server": "bentoml serve service.api:InfantinO (testkit.server.BentoServer, STILL_MODEL_ENV: no online update)",
                     "model": "shipped (infantino bootstrap)",
                     "images": f"{len(photos)} 640x480 JPEG q90 face photos (bench.serve.make_photos), mean "
                               f"{np.mean([len(p) for p in photos]) / 1024:.0f} KB",
                     "load_generator": "locust (FastHttpUser, headless subprocess, closed loop, wait 0, keep-alive), "
                                       "same machine as the server",
                     "feedback": "every request with a fresh idempotency key; labels cycle through the 7 classes; "
                                 "by-id clients take fresh prediction_ids from the /predict answers"},
        "load_average_before": load_before,
    }
    from importlib.metadata import version
    result["versions"] = {k: version(k) for k in ("locust", "bentoml", "httpx")}
    t_start = time.perf_counter()
    with BentoServer(env, log_path=server_log) as server:
        result["server_ready_s"] = round(time.perf_counter() - t_start, 1)
        log(f"[server] ready at {server.url} in {result['server_ready_s']} s")
        with httpx.Client(base_url=server.url, timeout=120) as c:  # warm-up: every path once, checked
            for p in photos[:4]:
                r = c.post("/predict", files={"image": ("face.jpg", p, "image/jpeg")})
                r.raise_for_status()
            pid = r.json()["prediction_id"]
            c.post("/feedback", json={"label": "happy", "prediction_id": pid}).raise_for_status()
            c.post("/feedback", files={"image": ("face.jpg", photos[0], "image/jpeg")}, data={"label": "happy"}).raise_for_status()
            queue_before = c.get("/model").json().get("queue")
        phases = {"mixed": (counts, args.seconds)}
        if args.alone_seconds > 0:
            phases["feedback_alone"] = ((0, counts[1], counts[2]), args.alone_seconds)
        result["phases"] = {}
        series = None
        for tag, (cnt, secs) in phases.items():
            run = run_locust(server.url, work, tag, cnt, secs)
            summary, t0, window = summarise(run["rows"])
            if tag == "mixed":
                series = time_series(run["rows"], t0, secs, 2.0)
            result["phases"][tag] = {"clients": dict(zip(("predict", "feedback_prediction_id", "feedback_image"), cnt)),
                                     "seconds": secs, "measured_window_s": round(window, 2), "endpoints": summary, "errors_5xx_or_connection": run["errors"][:50],
                                     **{k: run[k] for k in ("locust_exit_code", "locust_wall_s", "locust_cpu_s")}}
            if run["locust_exit_code"] not in (0, 1):  # 1: locust saw failures (reported above)
                result["phases"][tag]["locust_stderr_tail"] = run["locust_stderr_tail"]
            for name, s in summary.items():
                log(f"[{tag}] {name:28s} {s['requests']:6d} req  {s['throughput_per_s']:7.1f}/s  p50 {s['p50_ms']:7.1f}  "
                    f"p99 {s['p99_ms']:7.1f} ms  4xx {s['4xx']}  5xx {s['5xx']}  conn {s['connection_failures']}")
        with httpx.Client(base_url=server.url, timeout=120) as c:
            result["queue_before"], result["queue_after"] = queue_before, c.get("/model").json().get("queue")
    result["load_average_after"] = os.getloadavg()
    result["machine_busy_at_start"] = load_before[0] > 0.5 * (os.cpu_count() or 1)
    result["server_log_error_lines"] = server_error_lines(server_log)
    acked = sum(p["endpoints"].get("/feedback (all)", {}).get("ok", 0) for p in result["phases"].values())
    if isinstance(result["queue_before"], dict) and isinstance(result["queue_after"], dict):
        stored = result["queue_after"].get("queued", 0) - result["queue_before"].get("queued", 0)
        result["durability_check"] = {"feedback_acknowledged": acked, "queue_growth": stored, "equal": acked == stored}

    # feedback under /predict load vs alone
    ingest = json.loads((RESULTS / "feedback_ingest.json").read_text())
    alone_ref = {(lv["kind"], lv["clients"]): lv["acks_per_s"] for lv in ingest["levels"]}
    mixed = result["phases"]["mixed"]["endpoints"]
    cmp: dict = {"feedback_ingest_json": {f"{k}_{c}_clients": v for (k, c), v in alone_ref.items()},
                 "feedback_ingest_date": ingest.get("machine", {}).get("date")}
    for kind, name in (("prediction_id", "/feedback (prediction_id)"), ("image", "/feedback (image)")):
        if name not in mixed:
            continue
        under = mixed[name]["throughput_per_s"]
        row = {"acks_per_s_under_predict_load": under,
               "vs_feedback_ingest_1_client": round(under / alone_ref[(kind, 1)], 2),
               "vs_feedback_ingest_16_clients": round(under / alone_ref[(kind, 16)], 2)}
        alone = result["phases"].get("feedback_alone", {}).get("endpoints", {}).get(name)
        if alone:
            row["acks_per_s_alone_same_clients"] = alone["throughput_per_s"]
            row["vs_alone_same_clients"] = round(under / alone["throughput_per_s"], 2) if alone["throughput_per_s"] else None
        cmp[kind] = row
    result["feedback_under_load"] = cmp
    result["zero_5xx"] = all(s.get("5xx", 0) == 0 and s.get("connection_failures", 0) == 0
                             for p in result["phases"].values() for s in p["endpoints"].values())
    result["time_series_mixed"] = series
    result["wall_seconds"] = round(time.time() - started, 1)
    result["caveats"] = ["the load generator (locust) runs on the same machine as the server: see locust_cpu_s",
                         "other processes may share the CPU: see load_average_before/after vs cpu_count",
                         "no online update runs during the bench (STILL_MODEL_ENV); feedback only queues"]
    path = write_result(args.out, result)
    plot(series, RESULTS / f"{args.out}.png",
         f"InfantinO, {args.clients} clients ({counts[0]} /predict, {counts[1]}+{counts[2]} /feedback), "
         f"{args.seconds:g} s, shipped model, {os.cpu_count()} CPUs")
    log(f"wrote {path.relative_to(ROOT)} and {args.out}.png in {result['wall_seconds']:.0f} s; zero 5xx: {result['zero_5xx']}")
    if args.keep_work:
        log(f"kept {work}")
    else:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0 if result["zero_5xx"] else 1


if __name__ == "__main__":
    sys.exit(main())
