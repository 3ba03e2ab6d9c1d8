"""Model loading: the bundled model, tiny models of four architectures, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokattr
from tokattr.models import BUNDLED, ModelNotFoundError, load_model

PROMPT = "$16,000/-0.8="


def test_tiny_models_round_trip(tiny_model_dir):
    arch, path, original = tiny_model_dir
    lm = load_model(path)
    assert lm.path == path and lm.name == str(path)
    assert not lm.model.training
    assert lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token is not None
    assert lm.max_length == 128
    ids = lm.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, original(ids).logits)
    assert type(lm.model).__name__ == type(original).__name__, arch


def test_dtype_and_device(tiny_model_dir):
    _, path, _ = tiny_model_dir
    lm = load_model(path, device="cpu", dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert lm.device == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(path, dtype="float8")


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"no model folder at .*nope"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="no model folder"):
        load_model("./not/a/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a model folder"):
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="empty model name"):
        load_model("  ")


def test_hub_id_offline_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        load_model("some-org/some-model")


def test_unreachable_hub_fails_at_once(monkeypatch):
    # A closed local port stands in for a hub that cannot be reached: no traffic leaves.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ModelNotFoundError, match="hub cannot be reached"):
        load_model("some-org/some-model")


def test_bundled_model_loads():
    lm = tokattr.load_model("arith-tiny")
    assert lm.path == BUNDLED["arith-tiny"]
    toks = lm.tokenizer.convert_ids_to_tokens(lm.tokenizer(PROMPT).input_ids)
    assert toks == ["<s>", "▁$", "1", "6", ",", "0", "0", "0", "/", "-", "0", ".", "8", "="]
    assert lm.model.config.model_type == "llama"


def test_bundled_folder_is_small_and_plain_hf():
    folder = BUNDLED["arith-tiny"]
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, f"{size / 2**20:.1f} MiB"
    assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()
    # Loads with plain transformers, no tokattr code, no network.
    code = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(folder)!r})\n"
        "ids = t('9+3=', return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=4, do_sample=False)\n"
        "print(t.decode(out[0, ids.shape[1]:], skip_special_tokens=True))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith("12")


def test_import_tokattr_needs_no_lightning_or_wandb():
    code = (
        "import sys, tokattr\n"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'wandb') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_bundled_path_is_inside_the_package():
    assert Path(tokattr.__file__).parent in BUNDLED["arith-tiny"].parents
