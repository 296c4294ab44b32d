"""Distributed training: torchrun's variables, the distributed weighted sampler, DDP processes that
hold one model, and `torchrun --nproc_per_node 2 -m cli.main train` registering one model.

The multi-process tests run real processes on gloo (CPU), started the way torchrun starts them
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or by torchrun itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from testkit.faces import make_image_folder
from testkit.server import free_port
from training.distributed import Dist, DistributedWeightedSampler, current, gather_rows, shard

ROOT = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 600


# ---- fast: no processes -----------------------------------------------------------------------------

def test_torchrun_variables():
    assert Dist.from_env({}) == Dist(0, 1, 0) and not Dist.from_env({}).enabled
    d = Dist.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (d.rank, d.world_size, d.local_rank, d.enabled, d.is_main) == (3, 4, 1, True, False)
    assert Dist.from_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) == Dist(0, 1, 0)
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}, {"RANK": "0", "WORLD_SIZE": "0"}):
        with pytest.raises(ValueError):
            Dist.from_env(bad)
    # outside a process group everything is the single process
    assert current() == Dist()
    assert shard(10) == (0, 10)
    rows = np.arange(12.0).reshape(6, 2)
    assert gather_rows(rows, 6) is rows


def test_shards_cover_every_row_once():
    for n in (0, 1, 5, 12, 13):
        for world in (1, 2, 3, 4):
            bounds = [shard(n, Dist(r, world)) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1


def test_distributed_weighted_sampler_splits_one_balanced_draw():
    y = np.array([0] * 90 + [1] * 10)  # a long tail: class 1 is 10% of the data
    weights = np.where(y == 0, 1 / 90, 1 / 10)  # class-balanced item weights
    world, n = 2, len(y)
    samplers = [DistributedWeightedSampler(weights, n, r, world, torch.Generator().manual_seed(7)) for r in range(world)]
    reference = torch.Generator().manual_seed(7)
    seen_classes: Counter = Counter()
    for epoch in range(20):
        parts = [list(s) for s in samplers]  # each process iterates its own sampler, generators seeded alike
        assert [len(p) for p in parts] == [len(s) for s in samplers] == [n // world] * world
        drawn = torch.multinomial(torch.as_tensor(weights), n, replacement=True, generator=reference).tolist()
        # the processes' parts interleave back into exactly one draw (same for everyone, new each epoch)
        assert [parts[i % world][i // world] for i in range(n)] == drawn
        seen_classes.update(y[np.concatenate(parts)].tolist())
    share = seen_classes[1] / sum(seen_classes.values())
    assert 0.4 < share < 0.6, f"class-balanced sampling should draw the tail class about half the time, got {share:.2f}"
    assert DistributedWeightedSampler(weights, 5, 0, 2, torch.Generator()).__len__() == 2
    with pytest.raises(ValueError):
        DistributedWeightedSampler(weights, 1, 0, 2, torch.Generator())
    with pytest.raises(ValueError):
        DistributedWeightedSampler(weights, 10, 2, 2, torch.Generator())


# ---- slow: real processes ---------------------------------------------------------------------------

# One training process, as torchrun starts it: train_backbone inside training.distributed.session.
CHILD = r"""
import hashlib, json, sys
import numpy as np, torch
from training import distributed
from training.data import load_dataset, stratified_split
from training.trainer import TrainConfig, train_backbone

folder, out_dir, balance, result_file = sys.argv[1:5]
cfg = TrainConfig(backbone="test_efficientnet", image_size=32, batch_size=16, threads=1, balance=balance, epochs=1,
                  freeze_epochs=1 if balance == "none" else 0)  # none: a frozen first epoch, then DDP over everything

def digest(model):
    return hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in model.state_dict().values())).hexdigest()

with distributed.session() as d:
    data = load_dataset(folder, 32, True, classes=None)
    train, val = stratified_split(data, 0.25, 0)
    out = {"rank": d.rank, "world_size": d.world_size, "phases": []}
    for epochs, resume in ((2, False), (3, True)):
        seen = []
        cfg.epochs = epochs
        model = train_backbone(cfg, train, val, out_dir, resume=resume, on_epoch=lambda e, m: seen.append([e, m]))
        out["phases"].append({"epochs": seen, "digest": digest(model)})
json.dump(out, open(result_file, "w"))
"""


def _digest(state: dict) -> str:
    return hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in state.values())).hexdigest()


def _run_ranks(script: str, args: list[str], world: int, tmp_path: Path) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-c", script, *args, str(tmp_path / f"rank{rank}.json")],
                                       cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    done = []
    for p, log in procs:
        try:
            p.wait(CHILD_TIMEOUT_S)
        finally:
            if p.poll() is None:
                p.kill()
            log.close()
        done.append(subprocess.CompletedProcess(p.args, p.returncode))
    for rank, c in enumerate(done):
        assert c.returncode == 0, (tmp_path / f"rank{rank}.log").read_text()[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.parametrize("balance", ["sampler", "none"])
def test_ddp_processes_train_one_model(tmp_path, balance):
    """Two gloo processes: one model in both (DDP + rank 0's BatchNorm statistics), metrics of the
    whole validation set, one checkpoint by rank 0, resume in both, and the checkpoint still
    resumes in a single process. ``none`` also runs a frozen first stage (DDP rebuilt after it)."""
    from training.data import load_dataset, stratified_split
    from training.trainer import TrainConfig, accuracy, train_backbone
    from backbones.model import create_backbone

    folder = make_image_folder(tmp_path / "faces", per_class=14, seed=3)
    out_dir = tmp_path / "ckpt"
    _run_ranks(CHILD, [str(folder), str(out_dir), balance], 2, tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in results] == [0, 1] and all(r["world_size"] == 2 for r in results)

    first, second = ([r["phases"][i] for r in results] for i in range(2))
    # the same model in both processes after each phase, and the same (reduced) metrics
    assert first[0]["digest"] == first[1]["digest"], "ranks ended the first two epochs with different models"
    assert second[0]["digest"] == second[1]["digest"], "ranks ended the resumed epoch with different models"
    assert first[0]["epochs"] == first[1]["epochs"] and [e for e, _ in first[0]["epochs"]] == [0, 1]
    assert second[0]["epochs"] == second[1]["epochs"] and [e for e, _ in second[0]["epochs"]] == [2]  # resumed: only epoch 3 ran
    assert first[0]["digest"] != second[0]["digest"]

    # rank 0's checkpoint: the model both processes hold, every process's random streams
    ckpt = torch.load(out_dir / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["world_size"] == 2 and len(ckpt["rank_rngs"]) == 2
    assert _digest(ckpt["model"]) == second[0]["digest"]
    assert not torch.equal(ckpt["rank_rngs"][0][0], ckpt["rank_rngs"][1][0]), "the processes should augment differently"

    # the reported validation accuracy is the whole validation set's (summed over both halves)
    data = load_dataset(folder, 32, True, classes=None)
    train, val = stratified_split(data, 0.25, 0)
    cfg = TrainConfig(backbone="test_efficientnet", image_size=32, batch_size=16, threads=1, balance=balance, epochs=4,
                      freeze_epochs=1 if balance == "none" else 0)
    model = create_backbone("test_efficientnet", 3, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate)
    model.load_state_dict(ckpt["model"])
    assert second[0]["epochs"][0][1]["val_accuracy"] == pytest.approx(accuracy(model, val, cfg.preprocessing, "cpu"))

    # a single process resumes the distributed checkpoint
    seen = []
    train_backbone(cfg, train, val, out_dir, resume=True, on_epoch=lambda e, m: seen.append(e))
    assert seen == [3]
    assert "world_size" not in torch.load(out_dir / "last.pt", weights_only=False)


@pytest.mark.slow
def test_torchrun_train_registers_one_model(tmp_path):
    """`torchrun --nproc_per_node 2 -m cli.main train`: one registered pair, from rank 0, like the single-process command."""
    from registry.store import ModelRegistry
    from infantino.settings import Settings

    folder = make_image_folder(tmp_path / "faces", per_class=16, seed=2)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFANTINO_", "MLFLOW_"))}
    env.update(INFANTINO_HOME=str(home), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "cli.main", "train", "--data", str(folder),
           "--backbone", "test_efficientnet", "--image-size", "32", "--epochs", "2", "--batch-size", "16",
           "--classes", "auto", "--threads", "1"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "distributed training: 2 processes (gloo)" in output
    assert output.count("registered infantino-expression-backbone v1 and infantino-expression-head v1 as champion") == 1
    assert output.count("epoch 2/2: train_loss=") == 1  # rank 0 reports for both

    reg = ModelRegistry(Settings(home=home))
    assert [r["version"] for r in reg.list_versions("backbone")] == ["1"]
    assert [(r["version"], r["aliases"]) for r in reg.list_versions("head")] == [("1", ["champion"])]
    head = reg.load_head("champion")
    assert head.classes == ["happy", "sad", "surprise"]
    run = reg.client.get_run(head.run_id)
    assert run.data.params["world_size"] == "2" and int(run.data.params["n_train"]) + int(run.data.params["n_val"]) == 48
    assert "epoch_val_accuracy" in run.data.metrics and "val_accuracy" in run.data.metrics
    runs = reg.client.search_runs([reg.experiment_id()])
    assert len(runs) == 1, "only rank 0 may start an MLflow run"
    # the stored validation embeddings cover the whole validation split (gathered from both processes)
    replay, validation = reg.load_embeddings(head)
    assert len(validation.y) == int(run.data.params["n_val"]) and len(replay.y) == int(run.data.params["n_train"])
    ckpt = torch.load(home / "runs" / "expression-test_efficientnet" / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["world_size"] == 2
