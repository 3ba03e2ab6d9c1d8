"""Shared fixtures: tiny seeded models of several architectures, no network."""

from __future__ import annotations

import os

# No test may reach a model hub or W&B's servers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from _tiny import ALL_ARCHS, tiny_lm

from tokattr.data.tokenizer import build_tokenizer

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def arith_tokenizer():
    return build_tokenizer(model_max_length=128)


@pytest.fixture(scope="session", params=ALL_ARCHS)
def tiny_model_dir(request, tmp_path_factory):
    """A tiny seeded model of each architecture saved with save_pretrained, with the
    arithmetic tokenizer beside it: ``(arch, folder, the original model)``."""
    lm = tiny_lm(request.param)
    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    lm.model.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    return request.param, out, lm.model
