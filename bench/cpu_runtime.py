"""Which CPU settings and runtime run the shipped backbone fastest: the numbers behind the defaults.

    .venv/bin/python -m bench.cpu_runtime            # ~2 minutes on 2 CPU cores
    .venv/bin/python -m bench.cpu_runtime --onnx     # also ONNX Runtime (pip install onnxruntime onnx onnxscript)
    .venv/bin/python -m bench.cpu_runtime --onnx --openvino --skip-torch   # ONNX Runtime against OpenVINO (pip install openvino)

Model-only throughput (normalise + backbone on already resized uint8 arrays) of the shipped
backbone at batch 1 and 32 (the service's max batch), for: torch's default settings,
channels_last memory format, 1 vs all threads, and, with --onnx, the same model exported to
ONNX (backbones.runtime.export_onnx, as the service exports it) and run by ONNX Runtime, and with
--openvino the same ONNX compiled by OpenVINO (latency and throughput hints). --rounds alternates
the runtimes that many times, so a machine whose speed drifts affects each alike.
Results: bench/results/cpu_runtime.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from backbones.runtime import export_onnx
from bench.common import bootstrap_home, write_result
from infantino.images import normalise
from infantino.settings import Settings
from registry.store import ModelRegistry


def rate(run, x: np.ndarray, seconds: float) -> dict:
    """Images per second of ``run(x)`` over about ``seconds`` (after two warm-up calls)."""
    run(x)
    run(x)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(x)
        n += 1
    elapsed = time.perf_counter() - start
    return {"images_per_s": n * len(x) / elapsed, "ms_per_batch": 1000 * elapsed / n, "batches": n}


def calling(run, *first):
    """``x -> run(*first, {"x": x})[0]``: an exported runtime's call, one output."""
    return lambda x: run(*first, {"x": x})[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="measured seconds per configuration and batch size")
    ap.add_argument("--onnx", action="store_true", help="also export to ONNX and time ONNX Runtime")
    ap.add_argument("--openvino", action="store_true", help="also compile the ONNX export with OpenVINO and time it")
    ap.add_argument("--skip-torch", action="store_true", help="time only the exported runtimes")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the exported runtimes this many times")
    ap.add_argument("--accuracy-data", default=None,
                    help="also score each exported runtime on this data's validation split (train's 10%%, seed 0) with the "
                         "shipped head: what a lower precision costs (e.g. ../shared/data/fer2013_train.npz)")
    ap.add_argument("--out", default="cpu_runtime")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        done = bootstrap_home(home)
        if done.returncode:
            raise SystemExit(f"bootstrap failed: {done.stderr}")
        loaded = ModelRegistry(Settings(home=home)).load_backbone()
        model, prep = loaded.model.eval(), loaded.preprocessing
        rng = np.random.default_rng(0)
        batches = {b: normalise(rng.integers(0, 255, (b, prep.input_size, prep.input_size, 3), dtype=np.uint8), prep)
                   for b in (1, 32)}
        all_threads = torch.get_num_threads()

        def torch_run(channels_last: bool):
            m = model.to(memory_format=torch.channels_last) if channels_last else model.to(memory_format=torch.contiguous_format)

            def run(x):
                t = torch.from_numpy(x)
                if channels_last:
                    t = t.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode():
                    return m(t).numpy()
            return run

        configs = [("torch", all_threads, False), ("torch channels_last", all_threads, True),
                   ("torch 1 thread", 1, False), ("torch channels_last 1 thread", 1, True)]
        results: dict[str, dict] = {}
        for name, threads, channels_last in tqdm([] if args.skip_torch else configs, desc="torch configurations"):
            torch.set_num_threads(threads)
            run = torch_run(channels_last)
            results[name] = {f"batch_{b}": rate(run, x, args.seconds) for b, x in batches.items()}
        torch.set_num_threads(all_threads)
        model.to(memory_format=torch.contiguous_format)

        onnx = export_onnx(model, prep.input_size) if args.onnx or args.openvino else None
        reference = torch_run(False)(batches[32])
        runners = {}
        if args.onnx:
            import onnxruntime as ort

            for threads in (0, 1):  # 0: ONNX Runtime's default (one per core), as the service runs it
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = threads
                session = ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])
                runners[f"onnxruntime {threads or 'default'} thread(s)"] = calling(session.run, None), {"onnxruntime": ort.__version__}
        if args.openvino:
            import openvino as ov

            core = ov.Core()
            onnx_path = Path(tmp) / "backbone.onnx"
            onnx_path.write_bytes(onnx)
            # OpenVINO's own default precision: bf16 on CPUs that have it (AVX512-BF16, AMX), else f32
            for hint, precision in (("LATENCY", None), ("THROUGHPUT", None), ("LATENCY", "f32")):
                config = {"PERFORMANCE_HINT": hint, **({"INFERENCE_PRECISION_HINT": precision} if precision else {})}
                compiled = core.compile_model(core.read_model(onnx_path), "CPU", config)
                runners[f"openvino {hint.lower()} {precision or 'default precision'}"] = calling(compiled), {
                    "openvino": ov.__version__, "inference_precision": str(compiled.get_property("INFERENCE_PRECISION_HINT"))}
        for _ in tqdm(range(args.rounds if runners else 0), desc="exported runtimes"):
            for name, (run, about) in runners.items():
                timed = {f"batch_{b}": rate(run, x, args.seconds) for b, x in batches.items()}
                row = results.setdefault(name, {"rounds": [], "max_abs_diff_vs_torch": float(np.abs(run(batches[32]) - reference).max()), **about})
                row["rounds"].append(timed)
        if args.accuracy_data:
            from training.data import load_dataset, stratified_split

            head = ModelRegistry(Settings(home=home)).load_head()
            _, val = stratified_split(load_dataset(args.accuracy_data, prep.input_size, prep.grayscale, head.classes), 0.1, 0)
            for name, (run, _) in runners.items():
                emb = np.concatenate([run(normalise(val.x[i : i + 256], prep)) for i in range(0, len(val.x), 256)])
                results[name]["val_accuracy"] = float(np.mean(head.model.predict_proba(emb).argmax(1) == val.y))
                results[name]["val_n"] = len(val.y)
        for row in results.values():
            if "rounds" in row:  # the median round per batch size
                for key in row["rounds"][0]:
                    row[key] = sorted((r[key] for r in row["rounds"]), key=lambda t: t["images_per_s"])[len(row["rounds"]) // 2]

    base = results[next(iter(results))]["batch_32"]["images_per_s"]
    summary = {name: {"batch_1_images_per_s": round(r["batch_1"]["images_per_s"], 1),
                      "batch_32_images_per_s": round(r["batch_32"]["images_per_s"], 1),
                      "batch_32_vs_first": round(r["batch_32"]["images_per_s"] / base, 3),
                      **({"val_accuracy": round(r["val_accuracy"], 4)} if "val_accuracy" in r else {})}
               for name, r in results.items()}
    for name, row in summary.items():
        print(f"{name:32s} batch 1: {row['batch_1_images_per_s']:7.1f} img/s   batch 32: {row['batch_32_images_per_s']:7.1f} img/s "
              f"({row['batch_32_vs_first']:.2f}x)" + (f"  val accuracy {100 * row['val_accuracy']:.2f}%" if "val_accuracy" in row else ""))
    write_result(args.out, {
        "command": "python -m bench.cpu_runtime " + " ".join(sys.argv[1:]),
        "model": {"backbone": loaded.tags.get("backbone_name"), "preprocessing": prep.to_dict()},
        "torch": torch.__version__, "threads_default": all_threads, "summary": summary, "runs": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
