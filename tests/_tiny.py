"""Tiny seeded causal LMs on the arithmetic tokenizer, shared by the attribution tests."""

from __future__ import annotations

import functools

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tokattr.data.tokenizer import build_tokenizer
from tokattr.models import LanguageModel


@functools.cache
def tiny_lm(arch: str = "llama") -> LanguageModel:
    """A 2-layer, d_model 32 model with seeded random weights (cached: never mutate it)."""
    tok = build_tokenizer(model_max_length=128)
    ids = dict(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
            **ids,
        )
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids
        )
        model = GPT2LMHeadModel(config)
    elif arch == "gpt_neox":
        config = GPTNeoXConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            **ids,
        )
        model = GPTNeoXForCausalLM(config)
    elif arch == "qwen2":
        config = Qwen2Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **ids,
        )
        model = Qwen2ForCausalLM(config)
    else:
        raise ValueError(arch)
    return LanguageModel(model.eval(), tok, f"tiny-{arch}", None)


ARCHS = ("llama", "gpt2")
"""The two architectures every method is checked on."""
ALL_ARCHS = ("llama", "gpt2", "gpt_neox", "qwen2")
"""Architectures the target functions and batching are checked on."""


def unpadded(lm: LanguageModel, prompt: str, answer: str):
    """``(ids [seq], n_prompt, feature_cols [n])`` of prompt + answer, tokenized directly."""
    tok = lm.tokenizer
    prompt_enc = tok(prompt, return_special_tokens_mask=True)
    n_prompt = len(prompt_enc["input_ids"])
    ids = torch.tensor(tok(prompt + answer)["input_ids"])
    special = torch.tensor(prompt_enc["special_tokens_mask"]).bool()
    return ids, n_prompt, (~special).nonzero().flatten()


def direct_log_prob(lm: LanguageModel, embeds: torch.Tensor, ids: torch.Tensor, n_prompt: int):
    """Reference target, written independently of tokattr.targets: full-sequence logits of
    unpadded rows ``embeds [k, seq, d_model]``, summed answer log-probs. [k]"""
    logits = lm.model(inputs_embeds=embeds).logits.float()  # [k, seq, vocab]
    logp = logits.log_softmax(-1)
    cols = torch.arange(n_prompt, ids.shape[0])
    return logp[:, cols - 1, ids[cols]].sum(-1)


def baseline_embeds(lm: LanguageModel, ids: torch.Tensor, feature_cols: torch.Tensor, how="pad"):
    """Embeddings ``[1, seq, d]`` with every feature replaced by the baseline."""
    emb = lm.model.get_input_embeddings()
    x = emb(ids)[None].detach()
    if how == "zero":
        vec = torch.zeros(x.shape[-1])
    else:
        vec = emb.weight[lm.tokenizer.pad_token_id if how == "pad" else lm.tokenizer.unk_token_id]
    b = x.clone()
    b[0, feature_cols] = vec.detach()
    return x, b


def model_problem(lm: LanguageModel, prompts, answers, batch_size: int = 16, seed: int = 0):
    """An AttributionProblem over a padded batch, log-prob target, pad baseline."""
    from tokattr.batching import collate, encode_example
    from tokattr.methods.problem import AttributionProblem
    from tokattr.targets import log_prob, target_inputs

    batch = collate(
        lm.tokenizer,
        [encode_example(lm.tokenizer, p, a) for p, a in zip(prompts, answers, strict=True)],
    )
    embeds = lm.model.get_input_embeddings()(batch.input_ids).detach()
    pad = lm.model.get_input_embeddings().weight[lm.tokenizer.pad_token_id].detach()
    baselines = torch.where(batch.feature_mask[..., None], pad, embeds)

    def forward(x, inputs):
        return log_prob(lm.model, x, inputs)

    problem = AttributionProblem(
        forward,
        embeds,
        baselines,
        batch.feature_mask,
        target_inputs(batch),
        batch_size,
        (seed,) * len(prompts),
    )
    return problem, batch
