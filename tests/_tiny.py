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


def _token_ids(tok) -> dict[str, int | None]:
    return dict(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )


def _decoder(tok, positions: int, kv_heads: int | None = None) -> dict:
    """The config of a 2-layer, d_model 32 decoder on ``tok`` (Llama-style argument names)."""
    out = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=positions,
        **_token_ids(tok),
    )
    if kv_heads is not None:
        out["num_key_value_heads"] = kv_heads
    return out


def _gpt2(tok, positions: int) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=positions,
        **_token_ids(tok),
    )  # fmt: skip
    return GPT2LMHeadModel(config)


@functools.cache
def tiny_lm(arch: str = "llama") -> LanguageModel:
    """A 2-layer, d_model 32 model with seeded random weights (cached: never mutate it)."""
    tok = build_tokenizer(model_max_length=128)
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_decoder(tok, 128, kv_heads=4)))
    elif arch == "gpt2":
        model = _gpt2(tok, 128)
    elif arch == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**_decoder(tok, 128)))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_decoder(tok, 128, kv_heads=2)))
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
        model=lm.model,
    )
    return problem, batch


# Byte-level BPE (GPT-2's scheme: every byte is a symbol, merges learnt from text), so that a
# decoded and re-encoded string need not give back the same tokens, as with real tokenizers.
BPE_CORPUS = (
    "The capital of France is Paris. The capital of Italy is Rome. "
    "Ordered lists: one, two, three. Café, naïve, déjà vu, 東京, 日本語, Ελληνικά, emoji 🙂. "
    "Question: what is 12 plus 30? Answer: 42. The quick brown fox jumps over the lazy dog. "
    "def add(a, b):\n    return a + b\n"
) * 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.cache
def bpe_tokenizer(bos: bool = False, chat: bool = False):
    """A byte-level BPE tokenizer of ~400 tokens learnt from :data:`BPE_CORPUS` (deterministic).

    ``bos``: a BOS token is added to every text (as in Llama 3 and Mistral); ``chat``: Qwen2's
    ``<|im_start|>`` / ``<|im_end|>`` chat template. Padding on the left."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([BPE_CORPUS], trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>" if bos else "<|endoftext|>",
        eos_token="<|im_end|>" if chat else "<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    if chat:
        out.chat_template = CHAT_TEMPLATE
    return out


BPE_ARCHS = ("gpt2", "qwen2", "mistral")
"""Architectures checked on a byte-level BPE tokenizer: GPT-2 (no BOS), Qwen2 (chat
template), Mistral (BOS)."""


@functools.cache
def tiny_bpe_lm(arch: str = "gpt2") -> LanguageModel:
    """A 2-layer, d_model 32 model of ``arch`` on :func:`bpe_tokenizer` (cached: never mutate)."""
    from transformers import MistralConfig, MistralForCausalLM

    tok = bpe_tokenizer(bos=arch == "mistral", chat=arch == "qwen2")
    torch.manual_seed(1)
    if arch == "gpt2":
        model = _gpt2(tok, 256)
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_decoder(tok, 256, kv_heads=2)))
    elif arch == "mistral":
        config = MistralConfig(sliding_window=None, **_decoder(tok, 256, kv_heads=2))
        model = MistralForCausalLM(config)
    else:
        raise ValueError(arch)
    return LanguageModel(model.eval(), tok, f"tiny-bpe-{arch}", None)
