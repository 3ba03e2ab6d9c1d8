"""The training data of a lookup model: key-value contexts followed by answered queries.

A training sequence is one problem's definitions (:mod:`tokattr.data.lookup`) followed by
``queries`` answered queries of distinct keys, ``k4;B0;…;B0;k4</s>``; the loss is on the
answer digit and the token that ends each answer (``;`` or ``</s>``), as in the arithmetic
chains (:func:`tokattr.lightning.train_data.encode_chain`). The first query of a sequence is
exactly a benchmark prompt; the later ones teach the same lookup with more supervision per
sequence.

Small models trained on lookup sequences alone stay for thousands of steps on the plateau of
"copy some value of the context" (``bench/results/lookup-training.md``). The *induction
warm-up* mixes in repeated random sequences (a random string of keys, digits and ``;``
followed by itself, the loss on the copy), where every predicted token is predictable only by
induction (Olsson et al. 2022, "In-context learning and induction heads"): the dense signal
that gets a 2-layer model past the plateau within a few hundred steps.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from tokattr.data.lookup import KEYS, QUERY, SEPARATOR, TRAIN_SEEDS, LookupGenerator
from tokattr.data.tokenizer import build_tokenizer
from tokattr.lightning.train_data import Chain, ChainDataset, collate, encode_chain

REPEAT_LENGTH = (10, 60)
"""Characters of the random string of a repeated sequence (before it is repeated)."""


def repeated_chain(rng: random.Random, length: tuple[int, int] = REPEAT_LENGTH) -> Chain:
    """A random string of keys, digits and ``;`` followed by itself, the copy predicted.

    The copy's first two characters are not predicted: before them nothing says which earlier
    position the copy continues from.
    """
    chars = KEYS + "0123456789" + SEPARATOR
    s = "".join(rng.choice(chars) for _ in range(rng.randint(*length)))
    return Chain(s + s, ((len(s) + 2, 2 * len(s)),))


class LookupStream(ChainDataset):
    """Endless seeded stream of encoded lookup sequences (``input_ids``, ``labels``), with a
    share ``warmup_mix`` of repeated random sequences (:func:`repeated_chain`) in between."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        seed: int,
        pairs: tuple[int, int],
        queries: int,
        warmup_mix: float = 0.0,
        length: tuple[int, int] | None = None,
        filler: tuple[int, int] = (8, 48),
    ) -> None:
        if not 0.0 <= warmup_mix < 1.0:
            raise ValueError(f"warmup_mix must be in [0, 1), got {warmup_mix}")
        self.tokenizer = tokenizer
        self.generator = LookupGenerator(seed, pairs, length, filler)
        self.queries = queries
        self.warmup_mix = warmup_mix
        self.seed = seed
        self.next_index = 0

    def chains(self) -> Iterator[Chain]:
        index = 0
        mixer = random.Random(f"lookup-warmup:{self.seed}")
        while True:
            if self.warmup_mix and mixer.random() < self.warmup_mix:
                yield repeated_chain(mixer)
                continue
            defs, rng = self.generator.definitions(index)
            text = self.generator.context(defs, rng).text
            spans = []
            for key, value in rng.sample(defs, min(self.queries, len(defs))):
                text += f"{SEPARATOR}{key}{QUERY}"
                spans.append((len(text), len(text) + len(value)))
                text += value
            index += 1
            self.next_index = index
            yield Chain(text, tuple(spans))


class LookupDataModule(L.LightningDataModule):
    """Seeded lookup sequences for training; fresh benchmark prompts for validation.

    Args:
        seed: seed of the training stream.
        val_seed: seed of the validation problems (different from ``seed``).
        batch_size: sequences per training step.
        pairs: ``(lo, hi)`` definitions per sequence.
        queries: answered queries per training sequence.
        val_size: validation problems.
        warmup_mix: share of training sequences that are repeated random strings, the
            induction warm-up (module docstring); 0 for lookup sequences only.
        length: ``(lo, hi)`` characters of each context (before its queries), filled up with
            digit passages (:class:`tokattr.data.LookupGenerator`); ``None``: definitions
            only. Validation prompts have the same lengths, the query included.
        filler: ``(lo, hi)`` digits per filler passage.
    """

    def __init__(
        self,
        seed: int = TRAIN_SEEDS[0],
        val_seed: int = TRAIN_SEEDS[1],
        batch_size: int = 32,
        pairs: tuple[int, int] = (20, 52),
        queries: int = 4,
        val_size: int = 256,
        warmup_mix: float = 0.0,
        length: tuple[int, int] | None = None,
        filler: tuple[int, int] = (8, 48),
    ) -> None:
        super().__init__()
        if seed == val_seed:
            raise ValueError("seed and val_seed must differ: validation needs fresh problems")
        if batch_size < 1 or queries < 1 or val_size < 1:
            raise ValueError(
                f"batch_size, queries and val_size must be >= 1, got {batch_size}, {queries}, "
                f"{val_size}"
            )
        if not 0.0 <= warmup_mix < 1.0:
            raise ValueError(f"warmup_mix must be in [0, 1), got {warmup_mix}")
        LookupGenerator(val_seed, tuple(pairs), length, tuple(filler))  # checks them now
        self.save_hyperparameters()
        self.tokenizer = build_tokenizer(512)
        self.mix = {"lookup": 1.0}

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        stream = LookupStream(
            self.tokenizer,
            h.seed,
            tuple(h.pairs),
            h.queries,
            warmup_mix=h.warmup_mix,
            length=self._length,
            filler=tuple(h.filler),
        )
        self._stream = stream
        pad = self.tokenizer.pad_token_id
        return DataLoader(stream, batch_size=h.batch_size, collate_fn=lambda r: collate(r, pad))

    @property
    def problems_seen(self) -> int:
        """Contexts drawn by the training stream so far."""
        stream = getattr(self, "_stream", None)
        return stream.next_index if stream is not None else 0

    @property
    def _length(self) -> tuple[int, int] | None:
        length = self.hparams.length
        return None if length is None else (int(length[0]), int(length[1]))

    def val_buckets(self) -> list[str]:
        return ["lookup"]

    def card_accuracy(self, lm: object, n: int, seed: int) -> list:
        """The model card's accuracy rows: greedy exact match on fresh lookup problems."""
        from tokattr.accuracy import lookup_accuracy

        h = self.hparams
        return lookup_accuracy(lm, n, seed, tuple(h.pairs), self._length, tuple(h.filler))  # type: ignore[arg-type]

    def card_text(self) -> object:
        """What the model card says of this data set."""
        from tokattr.lightning.export import CardText

        return CardText(
            name="lookup-tiny",
            about="trained by tokattr on its key-value lookup generator "
            "(`tokattr.data.LookupGenerator`): the answer to a prompt comes from one known "
            "definition of a long context, the ground truth of context attribution "
            "(`tokattr bench --data.dataset lookup`)",
            training="Lightning, on CPU; each training sequence is one context of definitions "
            "followed by answered queries of distinct keys (loss on the answer digit and the "
            "token that ends each answer only), or, for a share of the batch "
            "(`warmup_mix`), a random string of keys, digits and `;` followed by itself "
            "(loss on the copy): the induction warm-up that gets the model past the "
            "copy-any-value plateau (`tokattr.lightning.lookup_data`).",
            accuracy="Rows by the number of definitions in the prompt, then by its length in "
            "tokens.",
            limits="Trained only on the generator's format: distinct one-letter keys, "
            "one-digit values, passages of digits as filler, `;` between parts, the query a "
            "key alone at the end, prompts of at most 400 tokens. Anything else is out of "
            "distribution.",
        )

    def val_dataloader(self) -> list[DataLoader]:
        pad = self.tokenizer.pad_token_id
        h = self.hparams
        gen = LookupGenerator(h.val_seed, tuple(h.pairs), self._length, tuple(h.filler))
        rows = []
        for p in gen.take(self.hparams.val_size):
            span = (len(p.prompt), len(p.prompt) + len(p.answer))
            rows.append(encode_chain(Chain(p.prompt + p.answer, (span,)), self.tokenizer))
        return [DataLoader(rows, batch_size=64, collate_fn=lambda r: collate(r, pad))]
