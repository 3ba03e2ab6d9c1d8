"""Models sharded over processes with FSDP2 (``configs/bench/fsdp.yaml``): the same scores as
one unsharded process, every example once, with ranks whose passes and batches differ."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOKATTR = [sys.executable, "-m", "tokattr.cli"]
METHODS = {
    "integrated_gradients": {"n_steps": 8}, "saliency": {}, "input_x_gradient": {},
    "occlusion": {}, "exact_shapley": {}, "kernel_shap": {"n_samples": 16},
    "shapley_sampling": {"n_samples": 2}, "context_cite": {"n_ablations": 16},
    "lime": {"n_samples": 16}, "gradient_shap": {"n_samples": 4}, "smoothgrad": {"n_samples": 4},
    "vargrad": {"n_samples": 4}, "attention": {}, "attention_rollout": {}, "value_zeroing": {},
    "attnlrp": {}, "cp_lrp": {}, "random": {},
}  # fmt: skip
ACCEPTANCE = {"integrated_gradients", "occlusion", "kernel_shap"}
"""Held to 1e-5 of the largest score; the others to 5e-5 (one process of 2 threads against two
of 1 thread each add matmul rounding in a different order)."""


def _bench(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        *TOKATTR, "bench", "--config", str(ROOT / "configs/bench/fsdp.yaml"),
        "--out_dir", str(out), "--wandb", "false", "--model.methods", json.dumps(METHODS),
        "--model.metrics", json.dumps(["comprehensiveness", "sufficiency"]),
        "--data.n", "7", "--data.batch_size", "3", "--data.mix", json.dumps({"add": 1}), *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)


def _rows(out: Path) -> dict[tuple[str, str], dict]:
    lines = (out / "attributions.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    keyed = {(r["example_id"], r["method"]): r for r in rows}
    assert len(keyed) == len(rows)  # every (example, method) once
    return keyed


@pytest.mark.ddp
def test_fsdp2_on_two_processes_equals_one_unsharded_process(tmp_path):
    """Every method; 7 examples in batches of 3, 3, 1: rank 0 gets two batches, rank 1 one,
    and their methods run different numbers of passes; the lockstep keeps the all-gathers
    matched."""
    sharded = _bench(tmp_path / "fsdp")
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    log = sharded.stdout + sharded.stderr
    assert "rank 0: 4 decoder layers sharded over 2 ranks" in log, log[-3000:]
    assert "rank 1: 4 decoder layers sharded over 2 ranks" in log
    whole = _bench(tmp_path / "one", "--trainer.devices", "1", "--trainer.strategy", "auto")
    assert whole.returncode == 0, whole.stderr[-4000:]
    assert "sharded" not in whole.stdout + whole.stderr
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "fsdp")
    assert a.keys() == b.keys() and len(a) == 7 * len(METHODS)
    parts = sorted((tmp_path / "fsdp" / "parts").glob("rank*.jsonl"))
    n = len(METHODS)
    assert [len(p.read_text().splitlines()) for p in parts] == [4 * n, 3 * n]  # 3+1 and 3
    for k, r in a.items():
        assert "error" not in r and "error" not in b[k], (k, b[k].get("error"))
        x, y = torch.tensor(r["scores"]), torch.tensor(b[k]["scores"])
        tol = 1e-5 if k[1] in ACCEPTANCE else 5e-5
        torch.testing.assert_close(y, x, rtol=tol, atol=tol * float(x.abs().max()))
        for m, v in r["metrics"].items():
            assert b[k]["metrics"][m] == pytest.approx(v, rel=1e-5, abs=1e-5)


def test_what_cannot_run_sharded_is_refused_before_work(tmp_path, capsys):
    from tokattr.cli import main

    config = str(ROOT / "configs/bench/fsdp.yaml")
    metrics = json.dumps(["randomization_spearman"])
    x, y = str(tmp_path / "x"), str(tmp_path / "y")
    assert main(["bench", "--config", config, "--model.metrics", metrics, "--out_dir", x]) != 0
    assert "randomization_spearman needs a second" in capsys.readouterr().err
    assert main(["bench", "--config", config, "--model.device_map", "auto", "--out_dir", y]) != 0
    assert "splits the model inside one process" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _lockstep_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from _tiny import tiny_lm
    from torch.distributed.device_mesh import init_device_mesh

    from tokattr.lightning.sharding import Lockstep, shard_layers

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        ref = tiny_lm("llama").model
        import copy

        model = copy.deepcopy(ref)
        assert shard_layers(model, init_device_mesh("cpu", (world,))) == 2
        assert type(model.model.layers[0]).__name__.startswith("FSDP")
        torch.manual_seed(rank)
        ids = [torch.randint(5, 30, (1 + rank, 4 + 3 * i)) for i in range(2 + 3 * rank)]
        got, want = [], []
        lockstep = Lockstep(model)
        with lockstep:
            for i, x in enumerate(ids):  # rank 1 runs more passes than rank 0, of other sizes
                e = model.get_input_embeddings()(x).detach().requires_grad_(i % 2 == 0)
                with torch.set_grad_enabled(i % 2 == 0):
                    logits = model(inputs_embeds=e).logits
                if i % 2 == 0:  # a gradient pass on one rank beside a plain pass on the other
                    (g,) = torch.autograd.grad(logits[:, -1].logsumexp(-1).sum(), e)
                    got.append(g)
                got.append(logits.detach())
            lockstep.drain()
        assert "forward" not in vars(model)  # the wrapper is gone
        for i, x in enumerate(ids):
            e = ref.get_input_embeddings()(x).detach().requires_grad_(i % 2 == 0)
            with torch.set_grad_enabled(i % 2 == 0):
                logits = ref(inputs_embeds=e).logits
            if i % 2 == 0:
                want.append(torch.autograd.grad(logits[:, -1].logsumexp(-1).sum(), e)[0])
            want.append(logits.detach())
        diff = max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))
        Path(out, f"rank{rank}.json").write_text(
            json.dumps({"diff": diff, "passes": lockstep.passes, "dummies": lockstep.dummies})
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_lockstep_matches_uneven_passes_and_leaves_the_model_as_sharded(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_lockstep_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert r[0]["diff"] <= 1e-6 and r[1]["diff"] <= 1e-6, r
    assert (r[0]["passes"], r[1]["passes"]) == (2, 5)
    assert r[0]["passes"] + r[0]["dummies"] == r[1]["passes"] + r[1]["dummies"]


@pytest.mark.parametrize("method", ["value_zeroing", "exact_shapley", "occlusion"])
def test_company_passes_leave_a_rank_own_work_alone(method, monkeypatch):
    """A rank whose own pass runs without gradients (in inference mode, as the perturbation
    passes do) while another rank's needs one runs a gradient dummy pass first; hooks that
    capture the method's own passes (value zeroing's) skip it. Scores as without the
    lockstep. (Votes stubbed: every round first asks for a gradient pass.)"""
    from _tiny import tiny_lm

    from tokattr.attribution import attribute
    from tokattr.lightning.sharding import Lockstep

    lm = tiny_lm("llama")
    kw = {"target": "35"}
    want = attribute(lm, "7x5=", method, **kw)
    lockstep = Lockstep(lm.model)
    votes = iter([2, 1] * 10_000)
    monkeypatch.setattr(lockstep, "_vote", lambda kind: max(kind, next(votes)))
    with lockstep:
        got = attribute(lm, "7x5=", method, **kw)
    assert lockstep.dummies > 0
    torch.testing.assert_close(got.scores, want.scores, atol=1e-6, rtol=1e-5)
