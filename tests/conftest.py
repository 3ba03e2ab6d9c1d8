"""Shared fixtures: tiny seeded models of several architectures, no network."""

from __future__ import annotations

import os

# No test may reach a model hub or W&B's servers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tokattr.data.tokenizer import build_tokenizer

torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_model(arch: str, vocab_size: int, seed: int = 0, **ids: int) -> PreTrainedModel:
    """A seeded random causal LM of ``arch`` with a few thousand parameters."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, **ids)
    if arch == "llama":
        cfg = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **common,
        )
        return LlamaForCausalLM(cfg).eval()
    if arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
        return GPT2LMHeadModel(cfg).eval()
    if arch == "gpt_neox":
        cfg = GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            **common,
        )
        return GPTNeoXForCausalLM(cfg).eval()
    if arch == "qwen2":
        cfg = Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **common,
        )
        return Qwen2ForCausalLM(cfg).eval()
    raise ValueError(arch)


ARCHS = ("llama", "gpt2", "gpt_neox", "qwen2")


@pytest.fixture(scope="session")
def arith_tokenizer():
    return build_tokenizer(model_max_length=128)


@pytest.fixture(scope="session", params=ARCHS)
def tiny_model_dir(request, tmp_path_factory, arith_tokenizer):
    """A tiny seeded model of each architecture saved with save_pretrained, with the
    arithmetic tokenizer beside it."""
    tok = arith_tokenizer
    model = tiny_model(
        request.param,
        len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return request.param, out, model
