"""Which CPU settings and runtime run the shipped backbone fastest: the numbers behind the defaults.

    .venv/bin/python -m bench.cpu_runtime            # ~2 minutes on 2 CPU cores
    .venv/bin/python -m bench.cpu_runtime --onnx     # also ONNX Runtime (pip install onnxruntime onnx onnxscript)

Model-only throughput (normalise + backbone on already resized uint8 arrays) of the shipped
backbone at batch 1 and 32 (the service's max batch), for: torch's default settings,
channels_last memory format, 1 vs all threads, and, with --onnx, the same model exported to
ONNX (backbones.runtime.export_onnx, as the service exports it) and run by ONNX Runtime.
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="measured seconds per configuration and batch size")
    ap.add_argument("--onnx", action="store_true", help="also export to ONNX and time ONNX Runtime")
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
        for name, threads, channels_last in tqdm(configs, desc="torch configurations"):
            torch.set_num_threads(threads)
            run = torch_run(channels_last)
            results[name] = {f"batch_{b}": rate(run, x, args.seconds) for b, x in batches.items()}
        torch.set_num_threads(all_threads)
        model.to(memory_format=torch.contiguous_format)

        if args.onnx:
            import onnxruntime as ort

            onnx = export_onnx(model, prep.input_size)
            for threads in (all_threads, 1):
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = threads
                session = ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])
                same = np.abs(session.run(None, {"x": batches[32]})[0] - torch_run(False)(batches[32])).max()
                results[f"onnxruntime {threads} thread(s)"] = {
                    **{f"batch_{b}": rate(lambda x: session.run(None, {"x": x})[0], x, args.seconds) for b, x in batches.items()},
                    "max_abs_diff_vs_torch": float(same), "onnxruntime": ort.__version__,
                }

    base = results["torch"]["batch_32"]["images_per_s"]
    summary = {name: {"batch_1_images_per_s": round(r["batch_1"]["images_per_s"], 1),
                      "batch_32_images_per_s": round(r["batch_32"]["images_per_s"], 1),
                      "batch_32_vs_torch_default": round(r["batch_32"]["images_per_s"] / base, 3)}
               for name, r in results.items()}
    for name, row in summary.items():
        print(f"{name:32s} batch 1: {row['batch_1_images_per_s']:7.1f} img/s   batch 32: {row['batch_32_images_per_s']:7.1f} img/s "
              f"({row['batch_32_vs_torch_default']:.2f}x)")
    write_result(args.out, {
        "command": "python -m bench.cpu_runtime" + (" --onnx" if args.onnx else ""),
        "model": {"backbone": loaded.tags.get("backbone_name"), "preprocessing": prep.to_dict()},
        "torch": torch.__version__, "threads_default": all_threads, "summary": summary, "runs": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
