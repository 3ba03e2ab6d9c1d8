"""The training data of the reference model: packed chains of solved arithmetic problems.

Training sequences are *chains* of solved problems joined by ``;`` (the data set's
demonstration separator) and packed up to ``max_len`` tokens:
``<s> 9+3=12;$16,000/-0.8=-20000;7 x 5 = 35 </s>``. The loss is on every answer token and on
the token that ends the answer (``;`` or ``</s>``), so each chain teaches several problems,
teaches the model to stop, and teaches it to answer after demonstrations.
:class:`ArithDataModule` streams them for training and holds fixed problems per bucket for
validation.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import PreTrainedTokenizerBase

from tokattr.data.arithmetic import SEPARATOR, ArithmeticGenerator
from tokattr.data.buckets import BUCKETS, DEFAULT_MIX
from tokattr.data.tokenizer import build_tokenizer

IGNORE = -100  # label value the loss skips


@dataclass(frozen=True)
class Chain:
    """A training text and the character spans ``[start, end)`` whose tokens are predicted."""

    text: str
    answer_spans: tuple[tuple[int, int], ...]


def encode_chain(chain: Chain, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """Token ids (``<s>`` … ``</s>``) and labels: the id where predicted, else ``-100``.

    A token is predicted when it starts inside an answer span, or it is the ``;`` right after
    one, or it is the final ``</s>``.
    """
    enc = tokenizer(chain.text, return_offsets_mapping=True)
    ids = [*enc["input_ids"], tokenizer.eos_token_id]
    offsets = [*enc["offset_mapping"], (len(chain.text), len(chain.text))]
    ends = {end for _, end in chain.answer_spans}
    labels = []
    for pos, (tid, (s, e)) in enumerate(zip(ids, offsets, strict=True)):
        in_answer = any(a <= s < b for a, b in chain.answer_spans) and e > s
        terminator = (s in ends and chain.text[s : s + 1] == SEPARATOR) or pos == len(ids) - 1
        labels.append(tid if (in_answer or terminator) else IGNORE)
    return {"input_ids": ids, "labels": labels}


class ChainDataset(IterableDataset):
    """An endless stream of encoded :class:`Chain` s (``input_ids``, ``labels``): a subclass
    gives ``chains()`` and ``tokenizer``."""

    tokenizer: PreTrainedTokenizerBase

    def chains(self) -> Iterator[Chain]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        for chain in self.chains():
            yield encode_chain(chain, self.tokenizer)


class ChainStream(ChainDataset):
    """Endless seeded stream of packed chains (``input_ids``, ``labels``).

    Problem ``i`` comes from ``ArithmeticGenerator(seed, mix).problem(i)``; chains are filled
    greedily up to ``max_len`` tokens (at least one problem each).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        seed: int,
        mix: Mapping[str, float],
        max_len: int,
        max_problems: int = 8,
    ) -> None:
        self.tokenizer = tokenizer
        self.generator = ArithmeticGenerator(seed=seed, mix=mix)
        self.max_len = max_len
        self.max_problems = max_problems
        self.next_index = 0

    def chains(self) -> Iterator[Chain]:
        index = 0
        # Characters bound tokens from above: one token per char, plus <s>, a metaspace, </s>.
        budget = self.max_len - 3
        while True:
            text, spans = "", []
            while len(spans) < self.max_problems:
                p = self.generator.problem(index)
                piece = p.prompt + p.answer
                start = len(text) + (1 if text else 0)
                if spans and start + len(piece) > budget:
                    break
                text = f"{text}{SEPARATOR}{piece}" if text else piece
                spans.append((start + len(p.prompt), start + len(piece)))
                index += 1
            self.next_index = index
            yield Chain(text, tuple(spans))


def collate(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row (training and teacher-forced evaluation: positions 0..)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [batch seq]
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # [batch seq]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [batch seq]
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class ArithDataModule(L.LightningDataModule):
    """Seeded arithmetic chains for training; one fixed set per bucket for validation.

    Args:
        seed: seed of the training stream.
        val_seed: seed of the validation problems (different from ``seed``).
        batch_size: chains per training step.
        max_len: tokens per packed chain.
        mix: bucket weights of the training stream (default: the generator's mix).
        val_per_bucket: validation problems per bucket (plus as many with demonstrations).
    """

    def __init__(
        self,
        seed: int = 0,
        val_seed: int = 1_000_003,
        batch_size: int = 64,
        max_len: int = 64,
        mix: dict[str, float] | None = None,
        val_per_bucket: int = 200,
    ) -> None:
        super().__init__()
        if seed == val_seed:
            raise ValueError("seed and val_seed must differ: validation needs fresh problems")
        if batch_size < 1 or max_len < 16:
            raise ValueError(
                f"batch_size must be >= 1 and max_len >= 16, got {batch_size}, {max_len}"
            )
        self.save_hyperparameters()
        self.tokenizer = build_tokenizer()
        self.mix = dict(mix or DEFAULT_MIX)

    def train_dataloader(self) -> DataLoader:
        stream = ChainStream(self.tokenizer, self.hparams.seed, self.mix, self.hparams.max_len)
        self._stream = stream
        pad = self.tokenizer.pad_token_id
        return DataLoader(
            stream, batch_size=self.hparams.batch_size, collate_fn=lambda r: collate(r, pad)
        )

    @property
    def problems_seen(self) -> int:
        """Problems drawn by the training stream so far (all of them are trained on)."""
        stream = getattr(self, "_stream", None)
        return stream.next_index if stream is not None else 0

    def val_buckets(self) -> list[str]:
        return [*BUCKETS, "demonstrations"]

    def card_accuracy(self, lm: object, n: int, seed: int) -> list:
        """The model card's accuracy rows: greedy exact match per arithmetic bucket."""
        from tokattr.accuracy import bucket_accuracy

        return bucket_accuracy(lm, n, seed)  # type: ignore[arg-type]

    def card_text(self) -> object:
        """What the model card says of this data set."""
        from tokattr.lightning.export import ARITH_CARD

        return ARITH_CARD

    def val_dataloader(self) -> list[DataLoader]:
        pad = self.tokenizer.pad_token_id
        loaders = []
        for bucket in self.val_buckets():
            if bucket == "demonstrations":
                gen = ArithmeticGenerator(self.hparams.val_seed, demonstrations=(1, 4))
            else:
                gen = ArithmeticGenerator(self.hparams.val_seed, mix=bucket)
            rows = []
            for p in gen.take(self.hparams.val_per_bucket):
                chain = Chain(
                    p.prompt + p.answer, ((len(p.prompt), len(p.prompt) + len(p.answer)),)
                )
                rows.append(encode_chain(chain, self.tokenizer))
            loaders.append(
                DataLoader(rows, batch_size=len(rows), collate_fn=lambda r: collate(r, pad))
            )
        return loaders
