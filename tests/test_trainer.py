"""Training loop: outputs, exact resume, variants, convergence, DDP equivalence, CLI."""
import gc
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from reco import config as config_lib
from reco.cli import main as cli_main
from reco.errors import ConfigError
from reco.trainer.checkpoint import latest_checkpoint, load_heads
from reco.trainer.train import build_optimizer, build_train_model, train, train_step
from tests.fixtures.trainer import synthetic_retrieval, write_synthetic_workdir

DIM, K = 32, 6
BASE = ["train.batch_size=64", "train.k=4", "train.head.heads=4", "train.warmup_steps=3",
        "train.shuffle_buffer=200", "train.steps=12", "train.checkpoint_every=6"]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("train")
    write_synthetic_workdir(wd, n=1024, dim=DIM, k=K, rows_per_shard=400, row_group_size=100)
    return wd


def _cfg(workdir, *sets):
    return config_lib.override(config_lib.preset("tiny", workdir=str(workdir)), [*BASE, *sets])


def test_train_writes_heads_checkpoints_logs_and_curve(workdir):
    cfg = _cfg(workdir)
    info = train(cfg)
    out = cfg.paths.heads
    assert info["steps"] == 12 and len(info["losses"]) == 12
    assert all(np.isfinite(info["losses"]))
    for name in ("heads.safetensors", "heads.json", "loss_curve.png", "history.json"):
        assert (out / name).stat().st_size > 0
    assert list((out / "tb").glob("events.out.tfevents*"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000006", "step-000012"]
    heads, meta = load_heads(out)
    assert sorted(heads) == ["image", "text"]
    assert (meta["dim"], meta["k"], meta["fusion"], meta["model_id"]) == (DIM, 4, "transformer", "test|synthetic")
    assert meta["fields"] == {"image": "v_img_txt", "text": "t_txt_img"} and meta["train"]["steps"] == 12
    q, ctx = F.normalize(torch.randn(3, DIM), dim=-1), F.normalize(torch.randn(3, 4, DIM), dim=-1)
    assert torch.allclose(heads["image"](q, ctx).norm(dim=-1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(workdir, tmp_path, workers):
    cfg = _cfg(workdir, f"train.num_workers={workers}", "train.head.dropout=0.1", "train.steps=10",
               "train.checkpoint_every=4")
    full = train(cfg, out_dir=tmp_path / "full")
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000004", part / "checkpoints" / "step-000004")
    resumed = train(cfg, out_dir=part, resume=True)
    assert resumed["start_step"] == 4 and resumed["resumed_from"].endswith("step-000004")
    assert resumed["losses"] == full["losses"]                    # history restored + exact tail
    a, b = load_file(tmp_path / "full" / "heads.safetensors"), load_file(part / "heads.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="differ from the checkpoint"):
        train(_cfg(workdir, "train.lr=0.01"), out_dir=part, resume=True)


@pytest.mark.parametrize("sets,sides", [(["train.fusion=mean"], ["image", "text"]),
                                        (["train.fusion=mlp"], ["image", "text"]),
                                        (["train.fuse_text=false"], ["image"]),
                                        (["train.fuse_image=false", "train.text_context=t_txt_img"], ["text"])])
def test_variants_train_and_load(workdir, tmp_path, sets, sides):
    info = train(_cfg(workdir, "train.steps=3", *sets), out_dir=tmp_path)
    heads, meta = load_heads(tmp_path)
    assert sorted(heads) == sides and np.isfinite(info["final_loss"])
    assert set(info["head_params_per_side"]) == set(sides)


def test_bad_train_options_are_clear_errors(workdir, tmp_path):
    with pytest.raises(ConfigError, match="train.k=7"):
        train(_cfg(workdir, "train.k=7"), out_dir=tmp_path)
    with pytest.raises(ConfigError, match="train.precision"):
        train(_cfg(workdir, "train.precision=fp8"), out_dir=tmp_path)
    with pytest.raises(ConfigError, match="does not start with 'v'"):
        train(_cfg(workdir, "train.image_context=t_txt_img"), out_dir=tmp_path)


def _recall_at_1(heads, data, k):
    v, t = torch.from_numpy(data["v"]), torch.from_numpy(data["t"])
    with torch.no_grad():
        vb = heads["image"](v, torch.from_numpy(data["v_img_txt"][:, :k]))
        tb = heads["text"](t, torch.from_numpy(data["t_txt_img"][:, :k]))
    sim = vb @ tb.T
    return float((sim.argmax(1) == torch.arange(len(v))).float().mean())


def test_retrieval_beats_same_capacity_mlp_when_the_context_carries_the_signal(tmp_path):
    wd = tmp_path / "wd"
    write_synthetic_workdir(wd, n=2048, dim=DIM, k=K, seed=0)
    held_out = synthetic_retrieval(256, DIM, K, seed=99)
    sets = ["train.steps=100", "train.batch_size=128", "train.warmup_steps=5", "train.lr=0.003",
            "train.checkpoint_every=1000"]
    scores = {}
    for fusion in ("transformer", "mlp"):
        info = train(_cfg(wd, f"train.fusion={fusion}", *sets), out_dir=tmp_path / fusion)
        heads, _ = load_heads(tmp_path / fusion)
        scores[fusion] = (_recall_at_1(heads, held_out, 4), info["first_loss"], info["final_loss"])
    raw = float(((torch.from_numpy(held_out["v"]) @ torch.from_numpy(held_out["t"]).T).argmax(1)
                 == torch.arange(256)).float().mean())
    tr, mlp = scores["transformer"], scores["mlp"]
    assert tr[2] < 0.5 * tr[1]                          # the loss falls a lot
    assert tr[0] > 0.85 and tr[0] > mlp[0] + 0.3 and tr[0] > raw + 0.3, (scores, raw)


# --------------------------------------------------------------------------------------------
# DDP on CPU (gloo): 2 processes on a split global batch == 1 process on the whole batch
# --------------------------------------------------------------------------------------------

def _global_batches(steps, n, seed=0):
    out = []
    for s in range(steps):
        d = synthetic_retrieval(n, 16, 3, seed=seed + s)
        out.append({key: torch.from_numpy(d[key]).half() for key in ("v", "t", "v_img_txt", "t_txt_img")})
    return out


def _run_steps(rank, world, batches, tc):
    torch.manual_seed(0)
    model = build_train_model(tc, 16, rank=rank, world_size=world)
    optimizer = build_optimizer(model, tc)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    losses = []
    for batch in batches:
        n = len(batch["v"]) // world
        local = {key: value[rank * n:(rank + 1) * n] for key, value in batch.items()}
        stats = train_step(net, optimizer, local, lr=1e-2, device=torch.device("cpu"))
        loss = torch.tensor([stats["loss"]], dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(loss)
        losses.append(float(loss) / world)
    return model, losses


def _ddp_worker(rank, world, port, out_dir, mode):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        if mode == "steps":
            tc = config_lib.override(config_lib.preset("tiny"), ["train.head.heads=2", "train.k=3"]).train
            model, losses = _run_steps(rank, world, _global_batches(4, 32), tc)
            if rank == 0:
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out_dir}/params.safetensors")
                with open(f"{out_dir}/losses.json", "w") as f:
                    json.dump(losses, f)
        else:
            cfg = _cfg(out_dir, "train.steps=4", "train.checkpoint_every=2")
            info = train(cfg, out_dir=f"{out_dir}/heads")
            with open(f"{out_dir}/losses-{rank}.json", "w") as f:
                json.dump(info["losses"], f)
        dist.barrier()                 # tear down together, after rank 0 has written its files
    finally:
        gc.collect()                   # the DDP wrapper holds the group (see trainer.process_group)
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), "steps"), nprocs=2)
    tc = config_lib.override(config_lib.preset("tiny"), ["train.head.heads=2", "train.k=3"]).train
    model, losses = _run_steps(0, 1, _global_batches(4, 32), tc)
    ddp_losses = json.loads((tmp_path / "losses.json").read_text())
    np.testing.assert_allclose(ddp_losses, losses, rtol=1e-5)
    params = load_file(tmp_path / "params.safetensors")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(params[key], value, rtol=1e-4, atol=1e-5)
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_ddp_train_runs_end_to_end_under_gloo(tmp_path, workdir):
    shutil.copytree(workdir / "neighbours", tmp_path / "neighbours")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), "train"), nprocs=2)
    l0, l1 = (json.loads((tmp_path / f"losses-{r}.json").read_text()) for r in (0, 1))
    assert l0 == l1 and len(l0) == 4
    assert load_heads(tmp_path / "heads")[1]["train"]["steps"] == 4
    assert latest_checkpoint(tmp_path / "heads").name == "step-000004"


def test_cli_train(workdir, tmp_path, capsys):
    rc = cli_main(["train", "--preset", "tiny", "--workdir", str(workdir), "--out", str(tmp_path),
                   *[a for s in BASE for a in ("--set", s)], "--set", "train.steps=2", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["out_dir"] == str(tmp_path)
    assert (tmp_path / "heads.json").exists()


def test_torchrun_cli_train_owns_its_process_group(workdir, tmp_path):
    """The user's multi-process path: torchrun starts 2 ranks, ``reco train`` initialises Gloo,
    trains on split batches, and tears the group down itself (trainer.process_group)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "reco.cli", "train", "--preset", "tiny",
           "--workdir", str(workdir), "--out", str(tmp_path), *[a for s in BASE for a in ("--set", s)],
           "--set", "train.steps=4", "--set", "train.checkpoint_every=2", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)                 # one JSON line: rank 0's only
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert load_heads(tmp_path)[1]["train"]["steps"] == 4
    assert latest_checkpoint(tmp_path).name == "step-000004"
