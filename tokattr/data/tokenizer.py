"""The arithmetic model's tokenizer: Llama style, one token per digit.

A ``▁`` metaspace marks a word start (as in Llama's SentencePiece), every digit is its own
token, and a word-initial ``▁`` merges with a following non-digit character, so
``$16,000/-0.8=`` becomes ``▁$ 1 6 , 0 0 0 / - 0 . 8 =`` after ``<s>``. The vocabulary is
printable ASCII plus those ``▁x`` merges, so any ASCII text tokenizes (to characters).
It is built with ``tokenizers`` and saved as a Hugging Face tokenizer, so
``AutoTokenizer.from_pretrained`` loads it back with no tokattr code.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

METASPACE = "▁"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, Llama's order plus a pad


def build_tokenizer(model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """A fresh tokenizer (deterministic: the same vocabulary and ids every time).

    Padding is on the left (the side generation and batched attribution want); a BOS token is
    added to every encoded text; ``;`` and ``</s>`` end an answer.
    """
    chars = [c for c in string.printable if not c.isspace()]
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in [METASPACE, *chars]:
        vocab.setdefault(c, len(vocab))
    merges = []
    for c in chars:
        if not c.isdigit():
            vocab[METASPACE + c] = len(vocab)
            merges.append((METASPACE, c))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="first"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="first")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
