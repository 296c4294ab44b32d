"""How close does InfantinO's serving get to the model's own limit, and to the usual alternatives?

One command, a few minutes on a 2-core CPU:

    .venv/bin/python -m bench.serve                  # full run (--duration 20 s per load level)
    .venv/bin/python -m bench.serve --quick          # smoke test: small numbers, same steps
    .venv/bin/python -m bench.serve --home DIR       # an INFANTINO_HOME whose registry has a champion

Without --home, a temporary home is made and ``infantino bootstrap`` registers the shipped model
(registry/default_model/); if that fails (no shipped model), testkit.registry.train_tiny_registry
trains a tiny one instead, and the JSON says so.

Test images: 640x480 JPEG photos (quality 90) of a face drawn with testkit.faces.draw_face,
resized onto a noisy background; the same bytes go to every measurement.

1. The limit, in-process (champion backbone + head loaded from the registry, torch.inference_mode,
   torch's default thread count):
   a) single-image latency end to end: JPEG decode + resize + normalise + backbone + head, p50/p99;
   b) throughput at batch sizes 1, 8, 16, 32, 64, end to end (decode + preprocess included,
      sequential in one thread) and model-only (normalise + backbone + head on already resized
      uint8 arrays). The best end-to-end batched throughput is "the limit".
2. InfantinO over HTTP: a real ``bentoml serve`` (testkit.server.BentoServer), closed-loop clients
   (1 and 16; each sends its next request when the previous one is answered) POSTing /predict
   multipart: throughput, p50/p99 latency, errors, and the adaptive batch sizes of the backbone's
   ``embed`` read from /metrics (difference over the measured window).
3. Alternatives, same clients and images:
   a) ``mlflow models serve`` of an MLflow pyfunc wrapping the same champion backbone + head
      (base64 image column -> decode -> preprocess -> predict), logged to a temporary tracking store;
   b) a plain Flask app (bench.flask_baseline), one model call per request.

Everything is also given relative to the limit (throughput / limit, latency - raw single-image
latency), with issue 17's goals: at 16 clients InfantinO >= 60 % of the limit, >= 4x mlflow serve,
p99 <= 2x p50 and no errors; at 1 client its p50 within 4 ms of the raw single-image p50; its cold
start (to ready) and resident memory per process reported.

Writes bench/results/serve.json (bench/common.write_result; serve_quick.json with --quick) and
prints a Markdown table. The load generator runs on the same machine as the servers, so it takes
some of the CPU they could use; the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.common import write_result

ROOT = Path(__file__).resolve().parents[1]

BATCH_SIZES = (1, 8, 16, 32, 64)
CLIENT_LEVELS = (1, 16)
PHOTO_W, PHOTO_H, JPEG_QUALITY = 640, 480, 90
_PROCS: list[subprocess.Popen] = []  # every server we start, killed (process group) at the end


def log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


# ---- processes ------------------------------------------------------------------------------------

def start_proc(cmd: list[str], env: dict, log_path: Path, cwd: Path = ROOT) -> subprocess.Popen:
    out = open(log_path, "ab")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    _PROCS.append(proc)
    return proc


def stop_proc(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def stop_all() -> None:
    for proc in _PROCS:
        stop_proc(proc)


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}:\n{tail(log_path)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s}s:\n{tail(log_path)}")


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


TORCH_THREADS = 0  # --torch-threads; 0: torch's default


def base_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["INFANTINO_HOME"] = str(home)
    if TORCH_THREADS:
        env["INFANTINO_TORCH_THREADS"] = str(TORCH_THREADS)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


# ---- model and images -----------------------------------------------------------------------------

def prepare_home(args, work: Path) -> tuple[Path, dict]:
    """The INFANTINO_HOME to benchmark, and where its model came from."""
    if args.home:
        return Path(args.home).resolve(), {"source": "given", "home": str(Path(args.home).resolve())}
    home = work / "home"
    home.mkdir()
    cmd = [sys.executable, "-m", "cli.main", "bootstrap"]
    log(f"[model] {' '.join(cmd)} (INFANTINO_HOME={home})")
    r = subprocess.run(cmd, cwd=ROOT, env=base_env(home), capture_output=True, text=True, timeout=900)
    if r.returncode == 0:
        return home, {"source": "bootstrap (shipped registry/default_model)", "home": "temporary", "bootstrap": r.stdout.strip()}
    why = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
    log(f"[model] bootstrap failed ({why[0]}); training the tiny test model instead (testkit.registry.train_tiny_registry)")
    for p in list(home.iterdir()):  # start from an empty home
        subprocess.run(["rm", "-rf", str(p)], check=True)
    import torch

    from testkit.registry import train_tiny_registry

    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines must not mix with the Markdown on stdout
        train_tiny_registry(home)
    torch.set_num_threads(threads)  # its TrainConfig(threads=1) set 1 for the whole process; the raw limit uses the default
    return home, {
        "source": "testkit.registry.train_tiny_registry (fallback)", "home": "temporary",
        "fallback_reason": f"`infantino bootstrap` failed: {why[0]}",
        "note": "a tiny test backbone (test_efficientnet, 48 px, 3 classes): NOT the shipped model; "
                "the model is so cheap that HTTP and decoding dominate",
        "train_seconds": round(time.perf_counter() - t0, 1),
    }


def make_photos(n: int, seed: int = 0) -> list[bytes]:
    """640x480 JPEG (q90) photos: a drawn face, resized, on a noisy background."""
    from PIL import Image, ImageFilter

    from testkit.faces import draw_face

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        yy, xx = np.mgrid[0:PHOTO_H, 0:PHOTO_W]
        base = 90 + 60 * np.sin(xx / (70 + 20 * rng.random()) + rng.random() * 6) * np.cos(yy / 90 + rng.random() * 6)
        bg = np.clip(base[..., None] + rng.normal(0, 28, (PHOTO_H, PHOTO_W, 3)) + rng.integers(-30, 30, 3), 0, 255)
        photo = Image.fromarray(bg.astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))
        side = int(rng.integers(300, 420))
        face = draw_face(i % 4, 96, rng).resize((side, side), Image.BICUBIC)
        photo.paste(face, (int(rng.integers(0, PHOTO_W - side)), int(rng.integers(0, PHOTO_H - side))))
        grain = rng.normal(0, 4, (PHOTO_H, PHOTO_W, 3))  # sensor noise over everything
        photo = Image.fromarray(np.clip(np.asarray(photo, np.float32) + grain, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        photo.save(buf, "JPEG", quality=JPEG_QUALITY)
        out.append(buf.getvalue())
    return out


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("bentoml", "mlflow", "flask", "gunicorn", "torch", "timm", "scikit-learn", "pillow", "httpx"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


# ---- 1. the limit, in-process ---------------------------------------------------------------------

def measure_raw(home: Path, photos: list[bytes], n_single: int, seconds_per_batch: float, torch_threads: int = 0) -> dict:
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)

    from backbones.inference import for_inference
    from backbones.runtime import create_runner
    from infantino.images import open_image, to_model_array
    from infantino.settings import Settings, get_settings
    from registry.store import CHAMPION, ModelRegistry

    registry = ModelRegistry(Settings(home=home))
    head = registry.load_head(CHAMPION)
    backbone = registry.load_backbone(head.backbone_version)
    model, prep, clf = for_inference(backbone.model), backbone.preprocessing, head.model  # as the backbone service loads it

    def preprocess(raw: bytes) -> np.ndarray:
        return to_model_array(open_image(raw, reduce_to=prep.input_size), prep.input_size, prep.grayscale)

    settings = get_settings()  # the backbone service's own runtime choice and thread setting
    embed = create_runner(prep, settings.models.backbone_runtime, model=model, threads=settings.serving.torch_threads)

    def infer(arrays: np.ndarray) -> np.ndarray:
        return clf.predict_proba(embed(arrays))

    info = {
        "backbone_version": backbone.version, "head_version": head.version, "classes": head.classes,
        "backbone_name": backbone.tags.get("backbone_name"), "preprocessing": prep.to_dict(),
        "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
    }
    # reference answer for photo 0, to check every server answers the same
    info["label_photo0"] = head.classes[int(infer(preprocess(photos[0])[None])[0].argmax())]

    # a) single image, end to end
    for raw in photos[:5]:  # warm-up
        infer(preprocess(raw)[None])
    total, dec, mod = [], [], []
    for i in tqdm(range(n_single), desc="raw single-image", unit="img", leave=False):
        t0 = time.perf_counter()
        arr = preprocess(photos[i % len(photos)])
        t1 = time.perf_counter()
        infer(arr[None])
        t2 = time.perf_counter()
        total.append((t2 - t0) * 1e3), dec.append((t1 - t0) * 1e3), mod.append((t2 - t1) * 1e3)
    single = {"runs": n_single, "p50_ms": pct(total, 50), "p99_ms": pct(total, 99), "mean_ms": float(np.mean(total)),
              "decode_resize_p50_ms": pct(dec, 50), "model_p50_ms": pct(mod, 50)}

    # b) throughput per batch size
    resized = np.stack([preprocess(r) for r in photos])
    batches = {}
    for bs in tqdm(BATCH_SIZES, desc="raw batch sizes", unit="size", leave=False):
        row = {}
        for mode in ("end_to_end", "model_only"):
            idx = [(k % len(photos)) for k in range(bs)]
            run = (lambda: infer(np.stack([preprocess(photos[k]) for k in idx]))) if mode == "end_to_end" else \
                  (lambda: infer(resized[idx]))
            run()  # warm-up at this shape
            n_img, n_batches, t0 = 0, 0, time.perf_counter()
            while True:
                run()
                n_img += bs
                n_batches += 1
                el = time.perf_counter() - t0
                if el >= seconds_per_batch and n_batches >= 2:
                    break
            row[mode] = {"images_per_s": n_img / el, "ms_per_batch": el / n_batches * 1e3, "batches": n_batches}
        batches[str(bs)] = row
    best = max(BATCH_SIZES, key=lambda b: batches[str(b)]["end_to_end"]["images_per_s"])
    best_model = max(BATCH_SIZES, key=lambda b: batches[str(b)]["model_only"]["images_per_s"])
    del model, clf
    return {
        "model": info,
        "single_image": single,
        "throughput": batches,
        "best_batch_size": best,
        "best_images_per_s": batches[str(best)]["end_to_end"]["images_per_s"],
        "best_model_only_batch_size": best_model,
        "best_model_only_images_per_s": batches[str(best_model)]["model_only"]["images_per_s"],
        "notes": "end_to_end = JPEG decode + resize (one thread, sequential) + normalise + backbone + head; "
                 "model_only = normalise + backbone + head on already resized uint8 arrays",
    }


# ---- HTTP load ------------------------------------------------------------------------------------

class Target:
    """How to send photo i to one server, with bodies built once (so clients spend little CPU)."""

    def __init__(self, name: str, url: str, path: str, bodies: list[bytes], headers: dict, label_of):
        self.name, self.url, self.path, self.bodies, self.headers, self.label_of = name, url, path, bodies, headers, label_of


def multipart_bodies(photos: list[bytes], field: str = "image") -> tuple[list[bytes], dict]:
    boundary = "infantino-bench-7d1f0c"
    bodies = [
        (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"photo{i}.jpg\"\r\n"
         f"Content-Type: image/jpeg\r\n\r\n").encode() + raw + f"\r\n--{boundary}--\r\n".encode()
        for i, raw in enumerate(photos)
    ]
    return bodies, {"content-type": f"multipart/form-data; boundary={boundary}"}


def mlflow_bodies(photos: list[bytes]) -> tuple[list[bytes], dict]:
    bodies = [json.dumps({"dataframe_split": {"columns": ["image_base64"], "data": [[base64.b64encode(r).decode()]]}}).encode()
              for r in photos]
    return bodies, {"content-type": "application/json"}


def check_target(t: Target, expected_label: str) -> dict:
    import httpx

    r = httpx.post(t.url + t.path, content=t.bodies[0], headers=t.headers, timeout=120)
    if r.status_code != 200:
        raise RuntimeError(f"{t.name}: {r.status_code} {r.text[:500]}")
    label = t.label_of(r.json())
    for i in range(1, min(4, len(t.bodies))):  # a few more warm-up calls
        httpx.post(t.url + t.path, content=t.bodies[i], headers=t.headers, timeout=120)
    return {"label_photo0": label, "same_label_as_raw": label == expected_label}


def run_level(t: Target, clients: int, duration: float, warmup: float, scrape=None) -> dict:
    """Closed loop: ``clients`` threads, each with its own httpx.Client, one request in flight each."""
    import httpx

    t_start = time.perf_counter() + 0.5
    t0, t1 = t_start + warmup, t_start + warmup + duration
    results: list[list[tuple[float, float, int | str]]] = [[] for _ in range(clients)]

    def client(k: int) -> None:
        rec = results[k]
        with httpx.Client(base_url=t.url, timeout=120, headers=t.headers) as c:
            i = k
            while time.perf_counter() < t_start:
                time.sleep(0.001)
            while True:
                s = time.perf_counter()
                if s >= t1:
                    break
                try:
                    r = c.post(t.path, content=t.bodies[i % len(t.bodies)])
                    status: int | str = r.status_code
                    if status == 200:
                        r.json()
                except Exception as exc:  # connection refused/reset, timeout...
                    status = type(exc).__name__
                rec.append((s, time.perf_counter(), status))
                i += clients

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for th in threads:
        th.start()
    before = after = None
    with tqdm(total=round(warmup + duration), desc=f"{t.name} x{clients}", unit="s", leave=False) as bar:
        for until in (t0, t1):
            while (now := time.perf_counter()) < until:
                time.sleep(min(0.5, until - now))
                bar.n = min(bar.total, max(0, round(time.perf_counter() - t_start)))
                bar.set_postfix(done=sum(len(r) for r in results), refresh=False)
                bar.refresh()
            if scrape:  # the histogram at the start and at the end of the measured window
                if until == t0:
                    before = scrape()
                else:
                    after = scrape()
    for th in threads:
        th.join(180)

    window = [x for rec in results for x in rec if x[0] >= t0 and x[1] <= t1]
    ok = [(e - s) * 1e3 for s, e, st in window if st == 200]
    errors: dict[str, int] = {}
    for _, _, st in window:
        if st != 200:
            errors[str(st)] = errors.get(str(st), 0) + 1
    out = {
        "clients": clients, "seconds": duration, "requests": len(window), "ok": len(ok),
        "errors": sum(errors.values()), "error_kinds": errors,
        "throughput_rps": len(ok) / duration,
        "p50_ms": pct(ok, 50), "p90_ms": pct(ok, 90), "p99_ms": pct(ok, 99), "mean_ms": float(np.mean(ok)) if ok else float("nan"),
    }
    if scrape and before is not None and after is not None:
        out["embed_batch_size"] = histogram_diff(before["batch"], after["batch"])
        out["worker_stages_ms"] = stage_means(before["stages"], after["stages"])
    return out


# ---- BentoML /metrics ---------------------------------------------------------------------------

# the backbone service's adaptive batches, or the API worker's own (INFANTINO_BACKBONE_PLACEMENT=inline)
_SAMPLE = re.compile(r'^(bentoml_service_adaptive_batch_size|infantino_inline_batch_size)_(bucket|sum|count)(?:\{([^}]*)\})?\s+(\S+)', re.M)


# where a prediction's time goes in the API worker (service/metrics.PREDICT_STAGE)
_STAGE = re.compile(r'^infantino_predict_stage_seconds_(sum|count)\{[^}]*stage="([^"]+)"[^}]*\}\s+(\S+)', re.M)


def scrape_metrics(url: str) -> dict:
    """The backbone's batch sizes and the worker's per-stage times, as /metrics has them now."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    stages: dict[str, dict[str, float]] = {}
    for kind, stage, value in _STAGE.findall(text):
        stages.setdefault(stage, {"sum": 0.0, "count": 0.0})[kind] += float(value)
    return {"batch": batch_histogram(text), "stages": stages}


def stage_means(before: dict, after: dict) -> dict:
    """Mean milliseconds per request in each worker stage over the measured window (the rest of a client's
    latency is BentoML's request handling, the network and the client)."""
    means = {}
    for stage, now in after.items():
        count = now["count"] - before.get(stage, {}).get("count", 0.0)
        if count:
            means[stage] = round((now["sum"] - before.get(stage, {}).get("sum", 0.0)) / count * 1e3, 2)
    return means


def batch_histogram(text: str) -> dict:
    """Sum over every series of the backbone's batch-size histogram (BentoML's with method_name="embed", or
    the inline one): {'sum', 'count', 'buckets': {le: cum}}."""
    h = {"sum": 0.0, "count": 0.0, "buckets": {}}
    for metric, kind, labels, value in _SAMPLE.findall(text):
        if metric.startswith("bentoml") and 'method_name="embed"' not in labels:
            continue
        if kind == "bucket":
            le = re.search(r'le="([^"]+)"', labels).group(1)
            h["buckets"][le] = h["buckets"].get(le, 0.0) + float(value)
        else:
            h[kind] += float(value)
    return h


def histogram_diff(before: dict, after: dict) -> dict:
    count = after["count"] - before["count"]
    total = after["sum"] - before["sum"]
    les = sorted(after["buckets"], key=lambda s: float("inf") if s == "+Inf" else float(s))
    dist, prev = {}, 0.0
    for le in les:
        cum = after["buckets"][le] - before["buckets"].get(le, 0.0)
        if cum - prev > 0:
            dist[f"<={le}"] = int(round(cum - prev))
        prev = cum
    return {"batches": int(round(count)), "images": int(round(total)),
            "mean": total / count if count else None, "distribution": dist,
            "note": "from /metrics, bentoml_service_adaptive_batch_size{method_name=\"embed\"}, difference over the measured window; "
                    "'<=le' counts batches whose size is in (previous le, le]"}


# ---- 3a. the MLflow pyfunc ------------------------------------------------------------------------

def make_pyfunc_class():
    import mlflow

    class InfantinoImagePyfunc(mlflow.pyfunc.PythonModel):
        """Column ``image_base64`` (one image per row) -> label, confidence, one probability column per class."""

        def load_context(self, context):
            import json as _json

            import mlflow.pytorch
            import mlflow.sklearn

            import os

            import torch

            from infantino.images import Preprocessing

            if int(os.environ.get("INFANTINO_TORCH_THREADS", "0") or 0):  # as the service does (bench --torch-threads)
                torch.set_num_threads(int(os.environ["INFANTINO_TORCH_THREADS"]))
            self.backbone = mlflow.pytorch.load_model(context.artifacts["backbone"], map_location="cpu").eval()
            self.head = mlflow.sklearn.load_model(context.artifacts["head"])
            meta = _json.loads(Path(context.artifacts["meta"]).read_text())
            self.prep = Preprocessing.from_dict(meta["preprocessing"])
            self.classes = meta["classes"]

        def predict(self, context, model_input, params=None):
            import base64 as _b64

            import pandas as pd
            import torch

            from infantino.images import normalise, open_image, to_model_array

            arrays = [to_model_array(open_image(_b64.b64decode(s), reduce_to=self.prep.input_size), self.prep.input_size, self.prep.grayscale)
                      for s in model_input["image_base64"]]
            with torch.inference_mode():
                emb = self.backbone(torch.from_numpy(normalise(np.stack(arrays), self.prep))).float().numpy()
            p = self.head.predict_proba(emb)
            best = p.argmax(axis=1)
            out = pd.DataFrame(p, columns=[f"p_{c}" for c in self.classes])
            out.insert(0, "confidence", p[np.arange(len(p)), best])
            out.insert(0, "label", [self.classes[b] for b in best])
            return out

    return InfantinoImagePyfunc


def log_pyfunc(home: Path, work: Path, photo: bytes) -> tuple[str, str, dict]:
    """Log the pyfunc wrapping the champion pair to a temporary tracking store; returns (model uri, tracking uri, info)."""
    from importlib.metadata import version

    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from infantino.settings import Settings
    from registry.store import CHAMPION, ModelRegistry

    reg = ModelRegistry(Settings(home=home))
    hv = reg.version_info("head", CHAMPION)
    bv = reg.version_info("backbone", hv.tags["backbone_version"])
    arts = work / "pyfunc_artifacts"
    arts.mkdir()
    backbone_dir = mlflow.artifacts.download_artifacts(f"models:/{reg.names['backbone']}/{bv.version}", dst_path=str(arts / "backbone"))
    head_dir = mlflow.artifacts.download_artifacts(f"models:/{reg.names['head']}/{hv.version}", dst_path=str(arts / "head"))
    meta = {"classes": hv.tags["label_set"].split(","),
            "preprocessing": {k.split(".", 1)[1]: v for k, v in bv.tags.items() if k.startswith("preprocessing.")},
            "backbone_version": bv.version, "head_version": hv.version}
    (arts / "meta.json").write_text(json.dumps(meta))

    cls = make_pyfunc_class()
    model = cls()
    model.load_context(type("Ctx", (), {"artifacts": {"backbone": backbone_dir, "head": head_dir, "meta": str(arts / "meta.json")}})())
    example = pd.DataFrame({"image_base64": [base64.b64encode(photo).decode()]})
    signature = infer_signature(example, model.predict(None, example))

    tracking = f"sqlite:///{work / 'mlflow_serve' / 'mlflow.db'}"
    (work / "mlflow_serve").mkdir()
    pins = [f"{n}=={version(n).split('+')[0]}" for n in ("mlflow", "torch", "timm", "scikit-learn", "skops", "numpy", "pandas", "pillow")]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking)
    try:
        exp = mlflow.create_experiment("serve-bench", artifact_location=(work / "mlflow_serve" / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp, run_name="infantino-pyfunc"):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=model,
                artifacts={"backbone": backbone_dir, "head": head_dir, "meta": str(arts / "meta.json")},
                code_paths=[str(ROOT / "infantino")],  # infantino.images: the same decoder as the service
                pip_requirements=pins, signature=signature,
            )
    finally:
        mlflow.set_tracking_uri(previous)
    return info.model_uri, tracking, {"pip_requirements": pins, "model_uri": info.model_uri, **meta}


# ---- servers ------------------------------------------------------------------------------------

def bench_infantino(home: Path, work: Path, photos, expected, levels, args) -> dict:
    from testkit.server import BentoServer

    env = {
        "INFANTINO_HOME": str(home), "INFANTINO_UPDATE_MIN_ITEMS": "1000000", "INFANTINO_UPDATE_INTERVAL_S": "1000000",
        # predictions are recorded (with the image) in the queue: keep them out of a given home's queue
        "INFANTINO_QUEUE_URL": f"sqlite:///{work / 'bench-feedback.db'}",
    }
    if TORCH_THREADS:
        env["INFANTINO_TORCH_THREADS"] = str(TORCH_THREADS)
    env.update(dict(kv.split("=", 1) for kv in args.bento_env))
    srv = BentoServer(env, log_path=work / "bentoml.log")
    out: dict = {"server": "bentoml serve service.api:InfantinO", "env": env, "log": str(work / "bentoml.log")}
    t = time.perf_counter()
    try:
        try:
            srv.start(timeout_s=300)
        except Exception as exc:
            raise RuntimeError(f"{exc}\n{tail(work / 'bentoml.log')}") from None
        finally:
            if srv.proc is not None:
                _PROCS.append(srv.proc)
        out["startup_s"] = round(time.perf_counter() - t, 1)
        bodies, headers = multipart_bodies(photos)
        target = Target("InfantinO", srv.url, "/predict", bodies, headers, lambda j: j["label"])
        out["check"] = check_target(target, expected)
        for c in levels:
            out[f"c{c}"] = run_level(target, c, args.duration, args.warmup, scrape=lambda: scrape_metrics(srv.url))
        out["processes"] = resident_memory(srv.proc.pid)
    finally:
        srv.stop()
    return out


def resident_memory(pid: int) -> dict:
    """Resident memory (MB) of a server's process tree after the load: each process, and their sum."""
    import psutil

    root = psutil.Process(pid)
    procs = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            cmd = " ".join(proc.cmdline())
            args = proc.cmdline()
            role = args[args.index("--service-name") + 1] if "--service-name" in args else ("supervisor" if proc is root else "other")
            procs.append({"pid": proc.pid, "rss_mb": round(proc.memory_info().rss / 2**20, 1), "role": role, "cmd": cmd[:160]})
        except psutil.Error:
            continue
    return {"each": procs, "total_rss_mb": round(sum(p["rss_mb"] for p in procs), 1), "count": len(procs)}


def bench_mlflow(home: Path, work: Path, photos, expected, levels, args) -> dict:
    from testkit.server import free_port

    t = time.perf_counter()
    uri, tracking, info = log_pyfunc(home, work, photos[0])
    out: dict = {"model": info, "log_seconds": round(time.perf_counter() - t, 1)}
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    env = base_env(home)
    env["MLFLOW_TRACKING_URI"] = tracking
    out["server"] = " ".join(shlex.quote(c) for c in cmd[1:]).replace("-m mlflow", "mlflow", 1)
    logp = work / "mlflow_serve.log"
    out["log"] = str(logp)
    bodies, headers = mlflow_bodies(photos)
    target = Target("mlflow serve", f"http://127.0.0.1:{port}", "/invocations", bodies, headers,
                    lambda j: j["predictions"][0]["label"])
    return measure_server(out, cmd, env, logp, target, expected, levels, args)


def measure_server(out: dict, cmd: list[str], env: dict, logp: Path, target: "Target", expected, levels, args) -> dict:
    """Start an alternative server, wait for its /ping, check one answer, then load it level by level."""
    t = time.perf_counter()
    proc = start_proc(cmd, env, logp)
    try:
        wait_http(f"{target.url}/ping", proc, 300, logp)
        out["startup_s"] = round(time.perf_counter() - t, 1)
        out["check"] = check_target(target, expected)
        for c in levels:
            out[f"c{c}"] = run_level(target, c, args.duration, args.warmup)
    finally:
        stop_proc(proc)
    return out


def bench_flask(home: Path, work: Path, photos, expected, levels, args) -> dict:
    from testkit.server import free_port

    port = free_port()
    if args.flask_server == "gunicorn":
        gunicorn = Path(sys.executable).parent / "gunicorn"
        cmd = [str(gunicorn), "-b", f"127.0.0.1:{port}", "-w", str(args.flask_workers), "--timeout", "120",
               "--chdir", str(ROOT), "bench.flask_baseline:create_app()"]
        desc = f"gunicorn -w {args.flask_workers} (sync workers) 'bench.flask_baseline:create_app()'"
    else:
        cmd = [sys.executable, "-m", "bench.flask_baseline", "--port", str(port)]
        desc = "Flask dev server, threaded=True (python -m bench.flask_baseline)"
    logp = work / "flask.log"
    out: dict = {"server": desc, "log": str(logp)}
    bodies, headers = multipart_bodies(photos)
    target = Target("Flask", f"http://127.0.0.1:{port}", "/predict", bodies, headers, lambda j: j["label"])
    return measure_server(out, cmd, base_env(home), logp, target, expected, levels, args)


# ---- report -------------------------------------------------------------------------------------

def relative(result: dict) -> None:
    """Add ratios to the limit in place, and the goals."""
    raw = result["raw"]
    limit, single = raw["best_images_per_s"], raw["single_image"]["p50_ms"]
    single99 = raw["single_image"]["p99_ms"]
    for name, srv in result["http"].items():
        for key, lvl in srv.items():
            if isinstance(lvl, dict) and "throughput_rps" in lvl:
                lvl["vs_limit"] = {
                    "throughput_fraction_of_limit": lvl["throughput_rps"] / limit,
                    "throughput_fraction_of_model_only_limit": lvl["throughput_rps"] / raw["best_model_only_images_per_s"],
                    "p50_minus_raw_single_p50_ms": lvl["p50_ms"] - single,
                    "p99_minus_raw_single_p99_ms": lvl["p99_ms"] - single99,
                }
    http = result["http"]
    goals = {}

    def get(name, level, key):
        try:
            return http[name][level][key]
        except (KeyError, TypeError):
            return None

    inf16, ml16, inf1 = get("infantino", "c16", "throughput_rps"), get("mlflow", "c16", "throughput_rps"), get("infantino", "c1", "p50_ms")
    p50_16, p99_16, err16 = get("infantino", "c16", "p50_ms"), get("infantino", "c16", "p99_ms"), get("infantino", "c16", "errors")
    # Issue 17's goals (the first round's, issue 7, were 80% of the limit and 2x mlflow serve).
    if inf16 is not None:
        goals["c16_throughput_>=60%_of_limit"] = {
            "met": inf16 >= 0.6 * limit, "infantino_rps": inf16, "limit_images_per_s": limit, "fraction": inf16 / limit}
    if inf16 is not None and ml16:
        goals["c16_throughput_>=4x_mlflow_serve"] = {"met": inf16 >= 4 * ml16, "infantino_rps": inf16, "mlflow_rps": ml16, "ratio": inf16 / ml16}
    if p99_16 is not None:
        goals["c16_p99_<=2x_p50_and_no_errors"] = {"met": p99_16 <= 2 * p50_16 and err16 == 0, "p50_ms": p50_16, "p99_ms": p99_16,
                                                   "ratio": p99_16 / p50_16, "errors": err16}
    if inf1 is not None:
        goals["c1_p50_within_4ms_of_raw_single"] = {
            "met": inf1 - single <= 4, "infantino_p50_ms": inf1, "raw_single_p50_ms": single, "difference_ms": inf1 - single}
    start, mem = http.get("infantino", {}).get("startup_s"), http.get("infantino", {}).get("processes")
    if start is not None:
        goals["cold_start_and_memory_reported"] = {
            "met": None, "startup_s": start, "total_rss_mb": mem and mem["total_rss_mb"], "processes": mem and mem["count"],
            "note": "issue 17 asks for half of the first round's: compare with a run of INFANTINO_BACKBONE_PLACEMENT=service in the "
                    "same minutes (README); the first round measured no memory, and its 8.1 s start was on a faster moment of this machine"}
    result["goals"] = goals
    # What batching can buy at most here: a server that runs each request alone can reach the raw
    # single-image rate; one that batches perfectly, the limit. (Both ignore HTTP and parallel decoding.)
    result["batching_headroom"] = {
        "limit_over_raw_single_rate": limit / (1e3 / raw["single_image"]["mean_ms"]),
        "note": "limit / (1000 / raw single-image mean ms): the most batching can gain over one-call-per-request serving "
                "on this machine and model, decoding being sequential; if < 2, the 2x-mlflow goal needs more than batching",
    }


def markdown(result: dict) -> str:
    raw = result["raw"]
    limit, single = raw["best_images_per_s"], raw["single_image"]
    lines = [
        f"Serving benchmark ({result['images']['width']}x{result['images']['height']} JPEG q{JPEG_QUALITY}, "
        f"~{result['images']['mean_kb']:.0f} KB; model: {result['model']['source']}; "
        f"{result['settings']['duration_s']:g} s per level{'; --quick' if result['settings']['quick'] else ''})",
        "",
        "| what | clients | throughput (img/s) | % of limit | p50 ms | p99 ms | p50 − raw single p50 | errors | batch (mean) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| raw, single image (decode+preprocess+model) | – | {1e3 / single['mean_ms']:.1f} | {1e3 / single['mean_ms'] / limit:.0%} "
        f"| {single['p50_ms']:.1f} | {single['p99_ms']:.1f} | 0 | – | 1 |",
    ]
    for bs in BATCH_SIZES:
        row = raw["throughput"][str(bs)]
        mark = " **(limit)**" if bs == raw["best_batch_size"] else ""
        lines.append(f"| raw, batch {bs}{mark} (model only: {row['model_only']['images_per_s']:.0f} img/s) | – "
                     f"| {row['end_to_end']['images_per_s']:.1f} | {row['end_to_end']['images_per_s'] / limit:.0%} "
                     f"| {row['end_to_end']['ms_per_batch']:.1f} / batch | – | – | – | {bs} |")
    names = {"infantino": "InfantinO (bentoml serve)", "mlflow": "`mlflow models serve` (pyfunc)", "flask": "Flask, one call per request"}
    for key, title in names.items():
        srv = result["http"].get(key)
        if not srv:
            continue
        if "error" in srv:
            lines.append(f"| {title} | – | failed: {srv['error'][:80]} | | | | | | |")
            continue
        for c in result["settings"]["clients"]:
            lvl = srv.get(f"c{c}")
            if not lvl:
                continue
            b = lvl.get("embed_batch_size", {}).get("mean")
            lines.append(f"| {title} | {c} | {lvl['throughput_rps']:.1f} | {lvl['vs_limit']['throughput_fraction_of_limit']:.0%} "
                         f"| {lvl['p50_ms']:.1f} | {lvl['p99_ms']:.1f} | {lvl['vs_limit']['p50_minus_raw_single_p50_ms']:+.1f} "
                         f"| {lvl['errors']} | {f'{b:.1f}' if b else '–'} |")
    for c in result["settings"]["clients"]:
        lvl = result["http"].get("infantino", {}).get(f"c{c}") or {}
        if lvl.get("worker_stages_ms"):
            stages = lvl["worker_stages_ms"]
            lines.append(f"\nInfantinO at {c} client(s), mean ms per request in the API worker's stages: "
                         + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
                         + f"; the rest of the mean latency {lvl['mean_ms']:.1f} ms ({lvl['mean_ms'] - sum(stages.values()):.1f} ms) "
                         "is BentoML's request handling, the network and the client.")
    lines.append("")
    lines.append(f"Limit = best raw batched throughput, decode + preprocess included: {limit:.1f} img/s at batch "
                 f"{raw['best_batch_size']} (model only: {raw['best_model_only_images_per_s']:.1f} img/s at batch "
                 f"{raw['best_model_only_batch_size']}). Raw single image p50 {single['p50_ms']:.1f} ms "
                 f"(decode+resize {single['decode_resize_p50_ms']:.1f} ms, model {single['model_p50_ms']:.1f} ms).")
    lines.append("")
    lines.append(f"Batching headroom (limit / raw single-image rate): {result['batching_headroom']['limit_over_raw_single_rate']:.2f}x.")
    lines.append("")
    for name, g in result["goals"].items():
        nums = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in g.items() if k != "met")
        lines.append(f"- {name}: **{'reported' if g['met'] is None else 'met' if g['met'] else 'not met'}** ({nums})")
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", default=None, help="INFANTINO_HOME whose registry has a champion (default: a temporary one, bootstrapped)")
    ap.add_argument("--quick", action="store_true", help="small numbers: checks the script end to end")
    ap.add_argument("--duration", type=float, default=None, help="seconds measured per load level (default 20; 4 with --quick)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds of load before each measured window (default 3; 1 with --quick)")
    ap.add_argument("--single-runs", type=int, default=None, help="raw single-image runs (default 200; 30 with --quick)")
    ap.add_argument("--batch-seconds", type=float, default=None, help="seconds per raw batch size and mode (default 4; 1 with --quick)")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch threads everywhere (raw, and INFANTINO_TORCH_THREADS for the three servers); 0: torch's default")
    ap.add_argument("--bento-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for bentoml serve, e.g. INFANTINO_API_WORKERS=2 (repeatable)")
    ap.add_argument("--images", type=int, default=32, help="distinct test photos")
    ap.add_argument("--flask-server", choices=("dev", "gunicorn"), default="dev",
                    help="Flask dev server (threaded=True) or gunicorn sync workers (gunicorn is in the venv)")
    ap.add_argument("--flask-workers", type=int, default=2, help="gunicorn workers (--flask-server gunicorn)")
    ap.add_argument("--skip", nargs="*", default=[], choices=("infantino", "mlflow", "flask"), help="servers to leave out")
    ap.add_argument("--out", default=None, help="result name under bench/results/ (default serve, or serve_quick with --quick)")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary folder (server logs, temp home)")
    args = ap.parse_args()
    q = args.quick
    args.duration = args.duration if args.duration is not None else (4.0 if q else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if q else 3.0)
    args.single_runs = args.single_runs or (30 if q else 200)
    args.batch_seconds = args.batch_seconds or (1.0 if q else 4.0)
    levels = CLIENT_LEVELS
    global TORCH_THREADS
    TORCH_THREADS = args.torch_threads

    for sig in (signal.SIGTERM, signal.SIGHUP):  # run the finally blocks (kill the servers) on termination too
        signal.signal(sig, lambda s, f: sys.exit(128 + s))

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="infantino-bench-serve-"))
    result: dict = {
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT), "-m", "bench.serve", *sys.argv[1:]]),
        "settings": {
            "quick": q, "duration_s": args.duration, "warmup_s": args.warmup, "clients": list(levels),
            "single_runs": args.single_runs, "batch_sizes": list(BATCH_SIZES), "batch_seconds": args.batch_seconds,
            "flask_server": args.flask_server, "flask_workers": args.flask_workers if args.flask_server == "gunicorn" else None,
            "load_generator": "closed loop, one thread per client, each with its own httpx.Client (keep-alive); "
                              "request bodies built once; on the same machine as the servers",
            "torch_threads": args.torch_threads or "torch default",
            "bento_env_extra": args.bento_env,
        },
        "versions": versions(),
        "load_average_before": os.getloadavg(),
        "http": {},
    }
    busy = os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1)
    if busy:
        log(f"[warning] the machine is busy (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs): "
            "the numbers will not be representative (and multi-threaded torch can stall waiting for a busy core: "
            "compare with --torch-threads 1)")
    try:
        steps = ["model", "raw"] + [s for s in ("infantino", "mlflow", "flask") if s not in args.skip]
        with tqdm(total=len(steps), desc="bench/serve", unit="step") as overall:
            overall.set_postfix(step="model")
            home, model_info = prepare_home(args, work)
            result["model"] = model_info
            photos = make_photos(args.images)
            sizes = [len(p) for p in photos]
            result["images"] = {"count": len(photos), "width": PHOTO_W, "height": PHOTO_H, "format": f"JPEG quality {JPEG_QUALITY}",
                                "mean_kb": float(np.mean(sizes)) / 1024, "min_kb": min(sizes) / 1024, "max_kb": max(sizes) / 1024,
                                "how": "testkit.faces.draw_face (96 px) resized to 300-420 px, pasted on a blurred noisy 640x480 background, sensor noise"}
            overall.update()

            overall.set_postfix(step="raw")
            result["raw"] = measure_raw(home, photos, args.single_runs, args.batch_seconds, args.torch_threads)
            result["model"].update(result["raw"].pop("model"))
            expected = result["model"]["label_photo0"]
            log(f"[raw] single p50 {result['raw']['single_image']['p50_ms']:.1f} ms; limit {result['raw']['best_images_per_s']:.1f} img/s "
                f"at batch {result['raw']['best_batch_size']}")
            overall.update()

            for name, fn in (("infantino", bench_infantino), ("mlflow", bench_mlflow), ("flask", bench_flask)):
                if name in args.skip:
                    continue
                overall.set_postfix(step=name)
                try:
                    result["http"][name] = fn(home, work, photos, expected, levels, args)
                    summary = ", ".join(f"c{c}: {result['http'][name][f'c{c}']['throughput_rps']:.1f} req/s "
                                        f"p50 {result['http'][name][f'c{c}']['p50_ms']:.0f} ms" for c in levels)
                    log(f"[{name}] {summary}")
                except Exception as exc:
                    log(f"[{name}] FAILED: {exc}\n{traceback.format_exc()}")
                    result["http"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                overall.update()
    finally:
        stop_all()

    result["load_average_after"] = os.getloadavg()
    result["wall_seconds"] = round(time.time() - started, 1)
    relative(result)
    result["machine_busy_at_start"] = busy
    result["caveats"] = [
        "clients run on the same machine as the servers and take some of its CPU",
        "other processes may share the CPU: see load_average_before/after (os.getloadavg) vs cpu_count",
        "InfantinO records every prediction (with the image bytes, INFANTINO_STORE_FEEDBACK_IMAGES default true) in its "
        "SQLite queue (a temporary file here); the alternatives do not",
    ]
    name = args.out or ("serve_quick" if q else "serve")
    path = write_result(name, result)
    print(markdown(result))
    print(f"\nwrote {path} in {result['wall_seconds']:.0f} s", file=sys.stderr)
    if args.keep_work:
        print(f"kept {work}", file=sys.stderr)
    else:
        subprocess.run(["rm", "-rf", str(work)])
    return 0 if all("error" not in v for v in result["http"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
