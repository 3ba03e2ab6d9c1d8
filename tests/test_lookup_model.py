"""The bundled model ``lookup-tiny``: accurate on fresh lookups, and a ground truth that
attribution methods can be checked against (the answer comes from one known definition)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

import tokattr
from tokattr.accuracy import LOOKUP_BAR, greedy_answers, lookup_accuracy
from tokattr.data.lookup import TRAIN_SEEDS, LookupGenerator
from tokattr.lightning.lookup_data import LookupDataModule, LookupStream, repeated_chain
from tokattr.lightning.train_data import IGNORE

ROOT = Path(__file__).resolve().parents[1]
BENCH_DATA = {"pairs": (5, 7), "length": (100, 160), "filler": (40, 64)}
"""The lookup data of ``configs/bench/lookup.yaml``."""
FRESH_SEED = 7  # not a training, validation or model-card seed
assert FRESH_SEED not in (*TRAIN_SEEDS, 2, 3, 2026)


@pytest.fixture(scope="module")
def lm():
    return tokattr.load_model("lookup-tiny")


def test_bundled_folder_and_card(lm):
    assert lm.path is not None and lm.path.name == "lookup-tiny"
    card = (lm.path / "README.md").read_text()
    assert "one-digit values" in card and "two-digit" not in card
    record = json.loads((lm.path / "training.json").read_text())
    assert len(record["stages"]) == 3
    assert record["stages"][-1]["data"]["length"] == [100, 400]  # the last stage saw filler
    pooled = record["stages"][-1]["accuracy"]["lookup"]
    assert pooled >= LOOKUP_BAR
    assert f"{pooled:.1%}" in card  # the card shows what training.json records


@pytest.mark.slow
def test_accuracy_on_fresh_benchmark_prompts(lm):
    """Greedy exact match >= 95% on the generator's default range (20-52 definitions among
    filler, 100-400 tokens), a fresh seed, and >= 90% in every length bin, the longest too."""
    rows = {r.bucket: r for r in lookup_accuracy(lm, n=300, seed=FRESH_SEED)}
    acc = {b: r.accuracy for b, r in rows.items()}
    assert rows["lookup"].accuracy >= LOOKUP_BAR, acc
    assert {"100-199 tokens", "200-299 tokens", "300-400 tokens"} <= set(rows), acc
    assert all(r.accuracy >= 0.9 for b, r in rows.items() if b.endswith("tokens")), acc


def test_answers_come_from_the_queried_key(lm):
    """Changing the queried definition's value changes the answer to it; changing another
    definition's value, or a filler passage's last digit, does not (on prompts the model gets
    right)."""
    gen = LookupGenerator(FRESH_SEED)
    problems = gen.take(24)
    answers = greedy_answers(lm, [p.prompt for p in problems], max_new_tokens=4)
    edited, expect = [], []
    for p, got in zip(problems, answers, strict=True):
        if got != p.answer:
            continue
        (src,) = p.sources
        _, e = p.segments[src]
        new = str((int(p.answer) + 3) % 10)
        edited.append(p.prompt[: e - 1] + new + p.prompt[e:])
        expect.append(new)
        other = (src + 1) % len(p.segments)
        _, e = p.segments[other]
        old = p.prompt[e - 1]
        edited.append(p.prompt[: e - 1] + str((int(old) + 1) % 10) + p.prompt[e:])
        expect.append(p.answer)
    assert len(edited) >= 40
    got = greedy_answers(lm, edited, max_new_tokens=4)
    agree = sum(g == x for g, x in zip(got, expect, strict=True)) / len(expect)
    assert agree >= 0.95, agree


def _top_is_source(lm, method: str, problems, **params) -> float:
    atts = tokattr.attribute(
        lm,
        [p.prompt for p in problems],
        method,
        target=[p.answer for p in problems],
        features=[list(p.segments) for p in problems],
        seed=0,
        **params,
    )
    hits = []
    for p, a in zip(problems, atts, strict=True):
        assert len(a.scores) == len(p.segments)
        assert a.features[p.sources[0]] == p.prompt[slice(*p.segments[p.sources[0]])]
        hits.append(int(torch.as_tensor(a.scores).argmax()) in p.sources)
    return sum(hits) / len(hits)


@pytest.mark.slow
def test_occlusion_finds_the_source(lm):
    """Removing the queried definition is what changes the answer: occlusion over
    definitions puts the source on top on >= 95% of fresh prompts."""
    problems = LookupGenerator(FRESH_SEED).take(60)
    assert min(len(p.prompt) for p in problems) >= 100
    assert _top_is_source(lm, "occlusion", problems) >= 0.95


def test_exact_shapley_finds_the_source(lm):
    """Exact Shapley over the parts of 100-160-token prompts (5-7 definitions among filler
    passages, the bench config's data) ranks the source first on >= 95% of prompts; the
    random control sits near chance."""
    gen = LookupGenerator(FRESH_SEED, **BENCH_DATA)
    problems = gen.take(20)
    assert max(len(p.segments) for p in problems) <= 12  # at most 4,096 coalitions
    assert _top_is_source(lm, "exact_shapley", problems, max_tokens=12) >= 0.95
    chance = sum(1 / len(p.segments) for p in problems) / len(problems)
    many = LookupGenerator(FRESH_SEED + 1, **BENCH_DATA).take(200)
    assert abs(_top_is_source(lm, "random", many) - chance) < 0.06


def test_the_stream_mixes_in_repeated_sequences():
    from tokattr.data.tokenizer import build_tokenizer

    tok = build_tokenizer(512)
    chain = repeated_chain(random.Random(0))
    half = len(chain.text) // 2
    assert chain.text[:half] == chain.text[half:]
    assert chain.answer_spans == ((half + 2, 2 * half),)
    rows = list(_take(LookupStream(tok, 0, (2, 16), 52, warmup_mix=0.5), 400))
    repeats = [r for r in rows if _is_repeat(tok, r)]
    assert 0.4 < len(repeats) / len(rows) < 0.6
    for r in repeats[:20]:
        ids, labels = r["input_ids"], r["labels"]
        predicted = [i for i, x in enumerate(labels) if x != IGNORE]
        assert predicted and all(labels[i] == ids[i] for i in predicted)
    plain = list(_take(LookupStream(tok, 0, (2, 16), 52), 50))
    assert not any(_is_repeat(tok, r) for r in plain)
    # The lookup sequences are the same with or without the warm-up, in the same order.
    mixed = [r for r in rows if not _is_repeat(tok, r)][:50]
    assert [r["input_ids"] for r in mixed] == [r["input_ids"] for r in plain]
    with pytest.raises(ValueError, match="warmup_mix must be in"):
        LookupDataModule(warmup_mix=1.0)


def _take(stream, n):
    it = iter(stream)
    return (next(it) for _ in range(n))


def _is_repeat(tok, row) -> bool:
    text = tok.decode(row["input_ids"], skip_special_tokens=True).strip()
    half = len(text) // 2
    return len(text) % 2 == 0 and text[:half] == text[half:]


def test_constant_schedule_warms_up_then_holds():
    from tokattr.lightning.train import ArithLM

    module = ArithLM(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                     lr=1e-3, warmup_pct=0.1, schedule="constant")  # fmt: skip

    class _T:
        estimated_stepping_batches = 100

    module.trainer = _T()  # type: ignore[assignment]
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert math.isclose(lrs[0], 1e-4) and math.isclose(lrs[9], 1e-3)
    assert all(math.isclose(x, 1e-3) for x in lrs[9:])
    with pytest.raises(ValueError, match="schedule must be"):
        ArithLM(schedule="cosine")


def test_the_lookup_bench_config_names_every_method():
    import yaml

    from tokattr.methods import METHODS

    cfg = yaml.safe_load((ROOT / "configs/bench/lookup.yaml").read_text())
    assert cfg["model"]["model"] == "lookup-tiny" and cfg["data"]["dataset"] == "lookup"
    assert set(cfg["model"]["methods"]) == set(METHODS)
    data = {k: tuple(cfg["data"][k]) for k in ("pairs", "length", "filler")}
    assert data == BENCH_DATA
    most = max(len(p.segments) for p in LookupGenerator(4242, **data).take(cfg["data"]["n"]))
    assert most <= cfg["model"]["methods"]["exact_shapley"]["max_tokens"]


@pytest.mark.slow
def test_the_lookup_bench_runs_and_finds_the_sources(tmp_path):
    """``configs/bench/lookup.yaml`` end to end on a few prompts: rows over definitions, and
    occlusion's top-1 source accuracy above the random control's."""
    from tokattr.cli import main

    out = tmp_path / "bench"
    code = main([
        "bench", "--config", str(ROOT / "configs/bench/lookup.yaml"), "--out_dir", str(out),
        "--model.methods", json.dumps({"occlusion": {}, "context_cite": {"n_ablations": 32},
                                       "random": {}}),
        "--model.metrics", json.dumps(["plausibility_top1", "comprehensiveness"]),
        "--model.metric_params", "{}", "--data.n", "24", "--data.batch_size", "8",
    ])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in (out / "attributions.jsonl").read_text().splitlines()]
    top1: dict[str, list[float]] = {}
    for r in rows:
        assert 5 <= len(r["features"]) <= 12 and len(r["sources"]) == 1
        top1.setdefault(r["method"], []).append(r["metrics"]["plausibility_top1"])
    mean = {m: sum(v) / len(v) for m, v in top1.items()}
    assert len(top1["occlusion"]) == 24
    assert mean["occlusion"] >= 0.9 and mean["context_cite"] >= 0.75, mean
    assert mean["random"] < 0.4, mean


def test_tokattr_train_runs_the_lookup_recipe(tmp_path):
    """The bundled recipe's options through ``tokattr train`` (a few steps of a tiny model):
    the warm-up mix and the constant schedule reach the data, the optimizer and the card."""
    import subprocess
    import sys

    out = tmp_path / "model"
    run = subprocess.run([
        sys.executable, "-m", "tokattr.cli", "train",
        "--config", str(ROOT / "configs/train/lookup_tiny.yaml"),
        "--trainer.default_root_dir", str(tmp_path), "--export_dir", str(out),
        "--eval_per_bucket", "8",
        "--trainer.max_steps", "12", "--trainer.val_check_interval", "6",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--model.hidden_size", "32", "--model.intermediate_size", "64",
        "--data.batch_size", "4", "--data.val_size", "8",
    ], capture_output=True, text=True, cwd=ROOT, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    stage = json.loads((out / "training.json").read_text())["stages"][-1]
    assert stage["data"]["warmup_mix"] == 0.5 and stage["model"]["schedule"] == "constant"
    card = (out / "README.md").read_text()
    assert "50% of them repeated random strings" in card
    assert "linear warm-up over 10% of the steps to 0.001, then constant" in card
    assert "Data mix" not in card  # one bucket: no mix table
