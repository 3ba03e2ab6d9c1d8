"""A model split by ``device_map`` (Accelerate's big-model inference) gives the unsplit
model's scores: half the layers offloaded to disk on this CPU machine, so the offload hooks,
the weight loads on every pass and the gradients through them are all exercised."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tokattr
from tokattr.methods import METHODS

pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["12+7=", "3x4=", "9-15="]
ANSWERS = ["19", "12", "-6"]


def _disk_map(model) -> dict[str, str]:
    """Embeddings and the first layer on the CPU, every later layer on disk."""
    n = model.config.num_hidden_layers
    out = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
           "lm_head": "cpu", "model.layers.0": "cpu"}  # fmt: skip
    out.update({f"model.layers.{i}": "disk" for i in range(1, n)})
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """``(whole, split)``: the bundled model, and the same folder with layers 1-3 on disk."""
    whole = tokattr.load_model("arith-tiny")
    split = tokattr.load_model(
        "arith-tiny",
        device_map=_disk_map(whole.model),
        offload_folder=tmp_path_factory.mktemp("offload"),
    )
    assert split.split and not whole.split
    on_disk = [n for n, p in split.model.named_parameters() if p.device.type == "meta"]
    assert on_disk and all(".layers.0." not in n for n in on_disk)
    return whole, split


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_equals_the_unsplit_model(pair, method):
    whole, split = pair
    params = {"n_samples": 8} if method in ("kernel_shap", "lime", "gradient_shap") else {}
    if method in ("smoothgrad", "vargrad"):
        params = {"n_samples": 4}
    if method == "shapley_sampling":
        params = {"n_samples": 2}
    if method == "context_cite":
        params = {"n_ablations": 16}
    if method == "integrated_gradients":
        params = {"n_steps": 8}
    a = tokattr.attribute(whole, PROMPTS, method, target=ANSWERS, seed=3, **params)
    b = tokattr.attribute(split, PROMPTS, method, target=ANSWERS, seed=3, **params)
    for x, y in zip(a, b, strict=True):
        assert x.tokens == y.tokens
        torch.testing.assert_close(y.scores, x.scores, rtol=1e-5, atol=1e-5)


def test_metrics_equal_the_unsplit_model(pair):
    whole, split = pair
    kw = dict(methods=["occlusion", "random"], metrics=["comprehensiveness", "sufficiency",
              "deletion_auc"], progress=False)  # fmt: skip
    a = tokattr.evaluate(whole, PROMPTS, ANSWERS, **kw)
    b = tokattr.evaluate(split, PROMPTS, ANSWERS, **kw)
    for m in ("comprehensiveness", "sufficiency", "deletion_auc"):
        for meth in ("occlusion", "random"):
            x, y = a.get(meth, m).mean, b.get(meth, m).mean
            assert y == pytest.approx(x, rel=1e-5, abs=1e-6)


def test_bad_combinations_are_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="device_map, not both"):
        tokattr.load_model("arith-tiny", device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="only with a device_map"):
        tokattr.load_model("arith-tiny", max_memory={"cpu": "1GiB"})
    whole = tokattr.load_model("arith-tiny")
    dm = _disk_map(whole.model)
    dm["model.embed_tokens"] = dm["lm_head"] = "disk"
    with pytest.raises(ValueError, match="input embeddings on disk"):
        tokattr.load_model("arith-tiny", device_map=dm, offload_folder=tmp_path)


def test_auto_with_a_small_max_memory_offloads(tmp_path):
    """``device_map="auto"`` with room for a part of the weights on the CPU puts the rest on
    disk, and still answers like the whole model."""
    whole = tokattr.load_model("arith-tiny")
    size = sum(p.numel() * p.element_size() for p in whole.model.parameters())
    split = tokattr.load_model(
        "arith-tiny", device_map="auto", max_memory={"cpu": size // 2}, offload_folder=tmp_path
    )
    assert split.split and "disk" in set(split.model.hf_device_map.values())
    a = tokattr.attribute(whole, PROMPTS[:2], "saliency", target=ANSWERS[:2])
    b = tokattr.attribute(split, PROMPTS[:2], "saliency", target=ANSWERS[:2])
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(y.scores, x.scores, rtol=1e-5, atol=1e-6)


def _bench(out, *extra):
    from tokattr.cli import main

    code = main([
        "bench", "--config", str(ROOT / "configs/bench/quick.yaml"), "--out_dir", str(out),
        "--model.methods", json.dumps({"integrated_gradients": {"n_steps": 8}, "occlusion": {},
                                       "kernel_shap": {"n_samples": 16}}),
        "--model.metrics", json.dumps(["comprehensiveness", "sufficiency"]),
        "--data.n", "6", "--data.batch_size", "3", "--wandb", "false", *extra,
    ])  # fmt: skip
    assert code == 0
    rows = [json.loads(x) for x in (out / "attributions.jsonl").read_text().splitlines()]
    return {(r["example_id"], r["method"]): r for r in rows}


def test_the_bench_runs_a_split_model_and_refuses_several_processes(tmp_path, capsys):
    """``tokattr bench --model.device_map``: the same rows as the whole model, and a clear
    error before any work for a map with several processes."""
    whole = tokattr.load_model("arith-tiny")
    dm = json.dumps(_disk_map(whole.model))
    a = _bench(tmp_path / "whole")
    b = _bench(tmp_path / "split", "--model.device_map", dm,
               "--model.offload_folder", str(tmp_path / "off"))  # fmt: skip
    assert a.keys() == b.keys() and len(a) == 18
    for k, r in a.items():
        torch.testing.assert_close(torch.tensor(b[k]["scores"]), torch.tensor(r["scores"]),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
        for m, v in r["metrics"].items():
            assert b[k]["metrics"][m] == pytest.approx(v, rel=1e-5, abs=1e-6)
    from tokattr.cli import main

    quick = str(ROOT / "configs/bench/quick.yaml")
    code = main(["bench", "--config", quick, "--trainer.devices", "2",
                 "--model.device_map", "auto", "--out_dir", str(tmp_path / "x")])  # fmt: skip
    assert code != 0
    assert "splits the model inside one process" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
