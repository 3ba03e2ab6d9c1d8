"""A benchmark that survives faults: NaN examples become error rows, any number of ranks
against any number of batches, one run per ``out_dir``, cheap checks before the model loads,
the weights in the run's identity, and the small refusals (bad JSONL lines, metrics that
apply to nothing, a re-initialised model equal to the model)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _tiny import tiny_bpe_lm, tiny_lm

from tokattr.attribution import attribute
from tokattr.cli import main
from tokattr.data import read_jsonl
from tokattr.lightning.prompts import PromptDataModule, RankShard
from tokattr.lightning.runner import AttributionModule
from tokattr.models import reinitialised
from tokattr.results import OutDirBusyError, OutDirLock, read_parts
from tokattr.table import MetricRow, _cell

ROOT = Path(__file__).resolve().parents[1]
TOKATTR = [sys.executable, "-m", "tokattr.cli"]
PROMPTS = [("1+2=", "3"), ("12+30=", "42"), ("7x5=", "35"), ("9-3=", "6"), ("8/2=", "4")]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(ROOT)
    return env


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(model: str | Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "bench",
        "--model.model", str(model),
        "--model.methods", json.dumps({"occlusion": {}, "saliency": {}}),
        "--model.metrics", json.dumps(["comprehensiveness", "loo_kendall_tau"]),
        "--data.jsonl", str(data),
        "--data.batch_size", "4",
        "--out_dir", str(out),
        "--report", "false",
        "--wandb", "false",
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
        *extra,
    ]  # fmt: skip


def _bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*TOKATTR, *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=ROOT)  # fmt: skip


def _merged(out: Path) -> list[dict]:
    with (out / "attributions.jsonl").open() as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory) -> Path:
    """Tiny Llama on the arithmetic tokenizer whose 'Z' embedding is NaN: a prompt with a Z
    gives NaN logits, the others are untouched."""
    lm = tiny_lm("llama")
    folder = tmp_path_factory.mktemp("nan-model")
    model = type(lm.model)(lm.model.config)
    model.load_state_dict(lm.model.state_dict())
    with torch.no_grad():
        for token in ("Z", "▁Z"):
            weight = model.get_input_embeddings().weight
            weight[lm.tokenizer.convert_tokens_to_ids(token)] = float("nan")
    model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def test_a_nan_example_is_an_error_row_and_a_rerun_keeps_it(nan_model, tmp_path):
    rows = [{"id": f"e{i}", "prompt": p, "answer": a} for i, (p, a) in enumerate(PROMPTS)]
    rows.insert(2, {"id": "bad", "prompt": "Z+1=", "answer": "2"})
    rows.append({"id": "free", "prompt": "hello world:"})  # no answer, not arithmetic: greedy
    data = _jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    run = _bench(*_args(nan_model, data, out))
    assert run.returncode == 0, run.stderr[-3000:]
    merged = _merged(out)
    assert len(merged) == len(rows) * 2
    bad = [r for r in merged if r["example_id"] == "bad"]
    assert len(bad) == 2 and all("NaN" in r["error"] and r["scores"] is None for r in bad)
    assert "logits are NaN" in bad[0]["error"]
    good = [r for r in merged if r["example_id"] != "bad"]
    assert all(not r.get("error") and r["scores"] for r in good)
    assert all(all(v == v for v in r["scores"]) for r in good)  # no NaN leaked to batch-mates
    free = [r for r in good if r["example_id"] == "free"]
    assert free[0]["answer_ids"] and free[0]["answer"]  # the greedy answer, as generated
    assert "have no scores (error rows)" in run.stderr and "bad / occlusion" in run.stderr
    assert "| occlusion | 6 | 1 |" in (out / "summary.md").read_text()
    # The same command again: nothing recomputed, the error row kept as it is.
    before = (out / "parts" / "rank0.jsonl").read_text()
    again = _bench(*_args(nan_model, data, out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "parts" / "rank0.jsonl").read_text() == before
    assert _merged(out) == merged
    # --retry_errors computes the error pairs again (and only those).
    retry = _bench(*_args(nan_model, data, out, "--retry_errors", "true"))
    assert retry.returncode == 0, retry.stderr[-3000:]
    added = (out / "parts" / "rank0.jsonl").read_text()[len(before) :].splitlines()
    assert sorted((json.loads(r)["example_id"], json.loads(r)["method"]) for r in added) == [
        ("bad", "occlusion"),
        ("bad", "saliency"),
    ]
    assert len(_merged(out)) == len(merged)


def test_a_scored_row_replaces_an_error_row_of_the_same_pair(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    row = {"example_id": "a", "method": "m", "prompt": "1+1=", "answer": "2"}
    (parts / "rank0.jsonl").write_text(json.dumps(row | {"error": "x"}) + "\n")
    (parts / "rank1.jsonl").write_text(
        json.dumps(row | {"scores": [1.0]}) + "\n"
        + json.dumps(row | {"error": "y"}) + "\n"
    )  # fmt: skip
    assert read_parts(tmp_path)[("a", "m")].scores == [1.0]


@pytest.mark.parametrize(("n_batches", "world"), [(1, 2), (1, 4), (3, 2), (5, 3), (0, 2)])
def test_every_batch_goes_to_exactly_one_rank(n_batches, world):
    todo = [[{"example_id": str(i)}] for i in range(n_batches)]
    shards = [list(RankShard(todo, world, rank)) for rank in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n_batches))
    assert [len(RankShard(todo, world, r)) for r in range(world)] == [len(s) for s in shards]


@pytest.mark.ddp
@pytest.mark.slow
def test_two_processes_over_one_batch_and_a_resume_with_one_batch_left(tmp_path):
    rows = [{"id": f"e{i}", "prompt": p, "answer": a} for i, (p, a) in enumerate(PROMPTS[:4])]
    data = _jsonl(tmp_path / "four.jsonl", rows)
    ddp = ("--trainer.devices", "2", "--trainer.strategy", "ddp")
    one_batch = tmp_path / "one-batch"
    run = _bench(*_args("arith-tiny", data, one_batch, *ddp))
    assert run.returncode == 0, run.stderr[-3000:]
    merged = _merged(one_batch)
    assert sorted((r["example_id"], r["method"]) for r in merged) == sorted(
        (f"e{i}", m) for i in range(4) for m in ("occlusion", "saliency")
    )
    # Eight examples in two batches, the second one lost: two ranks resume one batch.
    rows8 = rows + [
        {"id": f"f{i}", "prompt": p, "answer": a} for i, (p, a) in enumerate(PROMPTS[:4])
    ]
    data8 = _jsonl(tmp_path / "eight.jsonl", rows8)
    full = tmp_path / "full"
    assert _bench(*_args("arith-tiny", data8, full)).returncode == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    part = resumed / "parts" / "rank0.jsonl"
    kept = [
        line for line in part.read_text().splitlines() if json.loads(line)["example_id"][0] == "e"
    ]
    part.write_text("\n".join(kept) + "\n")
    (resumed / "attributions.jsonl").unlink()
    run = _bench(*_args("arith-tiny", data8, resumed, *ddp))
    assert run.returncode == 0, run.stderr[-3000:]
    # Half the examples kept, with every method: as many results left as kept.
    assert f"({len(kept)} of {2 * len(kept)} results already done, 4 examples complete)" in (
        run.stderr
    )
    again = _merged(resumed)
    assert [(r["example_id"], r["method"]) for r in again] == [
        (r["example_id"], r["method"]) for r in _merged(full)
    ]
    for a, b in zip(again, _merged(full), strict=True):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5, rel=1e-5)


def test_a_second_run_on_the_same_out_dir_is_refused_and_nothing_is_computed_twice(tmp_path):
    rows = [{"id": f"e{i}", "prompt": PROMPTS[i % 5][0], "answer": PROMPTS[i % 5][1]}
            for i in range(2000)]  # fmt: skip
    data = _jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    first = subprocess.Popen([*TOKATTR, *_args("arith-tiny", data, out)], env=_env(), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        part = out / "parts" / "rank0.jsonl"
        deadline = time.monotonic() + 300
        while not (part.exists() and part.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.05)  # the first run is computing
        second = _bench(*_args("arith-tiny", data, out))
        assert first.poll() is None  # still running: the refusal was not a late start
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 1, second.stderr[-2000:]
    assert "is in use by another run (pid" in second.stderr and str(first.pid) in second.stderr
    assert "Traceback" not in second.stderr
    assert part.exists() and part.read_text()
    lines = [line for line in part.read_text().splitlines() if line.endswith("}")]
    pairs = [(json.loads(r)["example_id"], json.loads(r)["method"]) for r in lines]
    assert len(pairs) == len(set(pairs)) > 0
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["rank0.jsonl"]


HOLD = """
import sys, time
from tokattr.results import OutDirLock
lock = OutDirLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_the_lock_is_refused_while_held_and_free_once_its_process_is_killed(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(OutDirBusyError, match=f"pid {holder.pid} on {socket.gethostname()}"):
            OutDirLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        holder.wait()
        holder.stdout.close()
    with OutDirLock(tmp_path) as lock:
        assert lock.owner()["pid"] == os.getpid()
    assert OutDirLock(tmp_path).owner() is None  # released: nobody named in it


def test_a_prompt_longer_than_the_context_fails_in_one_line_before_any_generation(monkeypatch):
    lm = tiny_bpe_lm("gpt2")  # a 256-token context
    prompt = "The capital of France is Paris. " * 200  # > 1,000 tokens

    def no_generation(*args, **kwargs):
        raise AssertionError("generated for a prompt that cannot fit")

    monkeypatch.setattr(lm.model, "generate", no_generation)
    with pytest.raises(ValueError) as err:
        attribute(lm, prompt, "saliency")
    message = str(err.value)
    assert "context of 256 leaves no room" in message
    assert "\n" not in message and len(message) < 250


def test_bench_checks_data_and_lengths_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import tokattr.lightning.runner

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(tokattr.lightning.runner, "load_model", no_load)
    rows = [{"id": "a", "prompt": "1+2=", "answer": "3"},
            {"id": "b", "prompt": "1+" * 300 + "1=", "answer": "301"}]  # fmt: skip
    long = _jsonl(tmp_path / "long.jsonl", rows)
    code = main(_args("arith-tiny", long, tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 1 and f"{long}:2: prompt 'b' is 604 tokens" in err, err
    assert len(err.strip().splitlines()) == 1 and len(err) < 300
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "1+2=", "answer": "3"}\n{"id": "b", "prompt": 123}\n')
    assert main(_args("arith-tiny", bad, tmp_path / "out")) == 1
    assert f'{bad}:2: "prompt" must be a string, got int' in capsys.readouterr().err
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"id": "a", "prompt": "1+2="}\n\xff\xfe\x00\x81')
    assert main(_args("arith-tiny", binary, tmp_path / "out")) == 1
    assert f"{binary}:2: not UTF-8 text" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before the out_dir lock was taken


def test_refusals_of_odd_inputs_stay_short():
    lm = tiny_lm("llama")
    with pytest.raises(TypeError) as err:
        attribute(lm, [list(range(3000))], "saliency")  # type: ignore[list-item]
    assert len(str(err.value)) < 150
    with pytest.raises(ValueError, match="token id 9999 is outside the vocabulary"):
        attribute(lm, "1+1=", "saliency", target=[9999])
    from tokattr.evaluation import evaluate

    with pytest.raises(TypeError, match="got BatchEncoding"):
        evaluate(lm, lm.tokenizer(["1=", "2="]), methods=["random"], progress=False)


def test_a_long_prompt_does_not_cut_its_batch_mates_answers_short():
    from tokattr.answers import greedy_answer_ids

    lm = tiny_bpe_lm("gpt2")  # 256-token context
    short = "The capital of France is"
    near_full = "The capital of France is Paris. " * 28  # a few tokens short of 256
    n = len(lm.tokenizer(near_full)["input_ids"])
    assert 256 - 12 < n < 256
    alone = greedy_answer_ids(lm, [short], max_new_tokens=12)
    together = greedy_answer_ids(lm, [short, near_full], max_new_tokens=12)
    assert len(alone[0]) > 256 - n  # longer than the long prompt leaves room for
    assert together[0] == alone[0] and len(together[1]) <= 256 - n


def test_a_jsonl_without_answers_keeps_them_unset_for_other_prompts(tmp_path):
    path = _jsonl(
        tmp_path / "d.jsonl", [{"id": "a", "prompt": "2+2="}, {"id": "b", "prompt": "Hi:"}]
    )
    a, b = read_jsonl(path)
    assert a.answer == "4" and b.answer is None and b.roles is None and b.line == 2


def test_weights_overwritten_in_place_are_refused_on_resume(tmp_path):
    folder = tmp_path / "model"
    lm = tiny_lm("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    data = _jsonl(tmp_path / "d.jsonl", [{"id": "a", "prompt": "1+2=", "answer": "3"}])
    out = tmp_path / "out"
    args = [*_args(folder, data, out), "--methods", '["saliency"]']
    assert main(args) == 0
    other = type(lm.model)(lm.model.config)  # new random weights, same shapes, same files
    other.save_pretrained(folder)
    assert main(args) == 1


def test_metric_checks_refuse_what_could_not_mean_anything():
    with pytest.raises(ValueError, match="none of the metrics"):
        AttributionModule(methods={"random": {}}, metrics=["completeness_error"])
    lm = tiny_lm("llama")  # built from its config under seed 0
    with pytest.raises(ValueError, match="same weights"):
        reinitialised(lm, 0)
    assert reinitialised(lm, 1).model is not lm.model


def test_small_values_are_not_printed_as_zero():
    row = MetricRow("m", "x", "", 2.8e-05, 1.1e-05, 4.9e-05, True, 10)
    assert _cell(row) == "2.80e-05 [1.10e-05, 4.90e-05]"
    assert _cell(MetricRow("m", "x", "", 0.25, 0.0, 0.5, True, 10)) == "0.250 [0.000, 0.500]"


def test_the_data_module_needs_no_trainer_to_list_its_work():
    dm = PromptDataModule(n=5, batch_size=2)
    assert [len(c) for c in dm.todo()] == [2, 2, 1]
