"""Where an API worker's time goes under 16 clients: a py-spy flame graph of `bentoml serve` as configured.

    .venv/bin/python -m bench.profile_serve [--seconds 15] [--bento-env KEY=VALUE ...]

Starts the service on the shipped model (a temporary, bootstrapped home), puts bench/serve's
16-client /predict load on it, and samples the API worker with py-spy (`record --nonblocking`,
50 Hz) meanwhile. Writes bench/results/serve_profile.svg (the flame graph) and
bench/results/serve_profile.json (the load's numbers, and the functions that were on the CPU in
the largest shares of samples, by their own time). py-spy needs ptrace rights (root, or
CAP_SYS_PTRACE in a container).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from bench import serve as bs
from bench.common import RESULTS, write_result
from testkit.server import BentoServer

CLIENTS = 16


def api_worker(server: BentoServer) -> int:
    """The pid of the server's API worker (``--service-name infantino``)."""
    for proc in psutil.Process(server.proc.pid).children(recursive=True):
        args = proc.cmdline()
        if "--service-name" in args and args[args.index("--service-name") + 1] == "infantino":
            return proc.pid
    raise RuntimeError("no API worker found under the server")


def own_time(folded: Path, top: int = 15) -> list[dict]:
    """The leaf frames of py-spy's folded stacks with the largest shares of samples."""
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        total += int(n)
        counts[stack.split(";")[-1]] += int(n)
    return [{"frame": frame, "share": round(n / total, 4)} for frame, n in counts.most_common(top)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="seconds sampled under load (default 15)")
    ap.add_argument("--bento-env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for the server")
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    work = Path(tempfile.mkdtemp(prefix="infantino-profile-"))
    home, _ = bs.prepare_home(argparse.Namespace(home=None), work)
    env = {**bs.base_env(home), "INFANTINO_UPDATE_MIN_ITEMS": "1000000", "INFANTINO_UPDATE_INTERVAL_S": "1000000",
           "INFANTINO_QUEUE_URL": f"sqlite:///{work / 'feedback.db'}", **dict(kv.split("=", 1) for kv in args.bento_env)}
    photos = bs.make_photos(32)
    bodies, headers = bs.multipart_bodies(photos)
    svg, folded = RESULTS / "serve_profile.svg", work / "profile.txt"
    with BentoServer(env, log_path=work / "bentoml.log") as server:
        target = bs.Target("InfantinO", server.url, "/predict", bodies, headers, lambda j: j["label"])
        bs.check_target(target, "?")
        pid = str(api_worker(server))
        common = ["record", "-p", pid, "-d", str(int(args.seconds)), "-r", "50", "--nonblocking"]
        samplers = [subprocess.Popen([spy, *common, "-o", str(svg)]), subprocess.Popen([spy, *common, "-f", "raw", "-o", str(folded)])]
        load = bs.run_level(target, CLIENTS, args.seconds + 1, 1.0)
        for s in samplers:
            s.wait()
    result = {"clients": CLIENTS, "seconds": args.seconds, "env": {k: v for k, v in env.items() if k.startswith("INFANTINO_")},
              "load": {k: load[k] for k in ("throughput_rps", "p50_ms", "p99_ms", "errors")},
              "own_time_top": own_time(folded), "flame_graph": str(svg.relative_to(RESULTS.parent.parent))}
    write_result("serve_profile", result)
    for row in result["own_time_top"][:10]:
        print(f"{row['share']:6.1%}  {row['frame']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
