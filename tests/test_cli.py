"""The ``tokattr`` command and the YAML configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tokattr.cli import main

ROOT = Path(__file__).resolve().parents[1]


def tokattr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tokattr.cli", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "eval-model"):
        assert name in out


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "train").glob("*.yaml")))
def test_train_configs_parse(config):
    run = tokattr("train", "--config", str(config), "--print_config")
    assert run.returncode == 0, run.stderr
    assert "max_steps" in run.stdout and "hidden_size" in run.stdout


def test_train_help_documents_options():
    run = tokattr("train", "--help")
    assert run.returncode == 0, run.stderr
    for opt in ("--export_dir", "--model.hidden_size", "--data", "--trainer.max_steps"):
        assert opt in run.stdout
    # Each data module's options, by class: arithmetic chains and key-value lookup.
    for cls, opt in (("ArithDataModule", "--data.mix"), ("LookupDataModule", "--data.pairs")):
        run = tokattr("train", "--data.help", cls)
        assert run.returncode == 0 and opt in run.stdout, run.stderr


def test_attribute_command_prints_features(capsys):
    assert main(["attribute", "--prompt+", "9 + 3 = 12;7 x 5 =", "--target+", "35",
                 "--method+", "occlusion", "--features", "separator:;"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "'9 + 3 = 12'" in out and "'7 x 5 ='" in out and "separator:;" in out
    assert main(["attribute", "--prompt+", "7x5=", "--features", "para"]) == 1
    assert "unknown features 'para'" in capsys.readouterr().err


def test_eval_model_runs_and_refuses_the_training_seed():
    run = tokattr("eval-model", "--n_per_bucket", "8", "--buckets", "[add, seed_like]")
    assert run.returncode == 0, run.stderr
    assert "add" in run.stdout and "seed_prompt" in run.stdout
    run = tokattr("eval-model", "--seed", "0", "--n_per_bucket", "2")
    assert run.returncode == 1
    assert "seed 0 is the seed" in run.stderr
    run = tokattr("eval-model", "--model", "/no/such/folder")
    assert run.returncode == 1 and "no model folder" in run.stderr
