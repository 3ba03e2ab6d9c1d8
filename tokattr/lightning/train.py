"""Training the reference model ``arith-tiny`` (Lightning layer: imports ``lightning``).

``tokattr train --config configs/train/arith_tiny.yaml`` fits :class:`ArithLM` on
:class:`ArithDataModule`, then saves the model with ``save_pretrained`` (safetensors), its
tokenizer, and a model card with greedy exact-match accuracy per bucket on fresh problems.

Training sequences are *chains* of solved problems joined by ``;`` (the data set's
demonstration separator) and packed up to ``max_len`` tokens:
``<s> 9+3=12;$16,000/-0.8=-20000;7 x 5 = 35 </s>``. The loss is on every answer token and on
the token that ends the answer (``;`` or ``</s>``), so each chain teaches several problems,
teaches the model to stop, and teaches it to answer after demonstrations.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, IterableDataset
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from tokattr.data.arithmetic import BUCKETS, DEFAULT_MIX, SEPARATOR, ArithmeticGenerator
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


class ChainStream(IterableDataset):
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

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        for chain in self.chains():
            yield encode_chain(chain, self.tokenizer)


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


class ArithLM(L.LightningModule):
    """A small ``LlamaForCausalLM`` trained on arithmetic with AdamW and a one-cycle schedule.

    Args:
        hidden_size: model width.
        num_layers: decoder layers.
        num_heads: attention heads (``hidden_size`` must divide by it).
        intermediate_size: MLP width.
        max_position_embeddings: context length (RoPE; also the tokenizer's max length).
        lr: peak learning rate of the one-cycle schedule.
        weight_decay: AdamW weight decay.
        warmup_pct: fraction of steps spent warming up.
        init_from: continue from a model folder saved by an earlier stage (its architecture
            replaces the size arguments above; its tokenizer must match).
    """

    def __init__(
        self,
        hidden_size: int = 192,
        num_layers: int = 4,
        num_heads: int = 6,
        intermediate_size: int = 512,
        max_position_embeddings: int = 256,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        warmup_pct: float = 0.05,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}"
            )
        self.save_hyperparameters()
        self.tokenizer = build_tokenizer(max_position_embeddings)
        if init_from is not None:
            self.model = self._load_stage(init_from)
        else:
            tok = self.tokenizer
            config = LlamaConfig(
                vocab_size=len(tok),
                hidden_size=hidden_size,
                intermediate_size=intermediate_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                num_key_value_heads=num_heads,
                max_position_embeddings=max_position_embeddings,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                tie_word_embeddings=True,
            )
            self.model = LlamaForCausalLM(config)
        self.val_names: list[str] = []
        self._losses: deque[float] = deque(maxlen=50)

    def _load_stage(self, folder: str) -> LlamaForCausalLM:
        path = Path(folder)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"init_from: no model folder at {path}")
        # from_pretrained returns eval mode, and Lightning keeps a submodule's mode.
        model = LlamaForCausalLM.from_pretrained(path).train()
        if model.config.vocab_size != len(self.tokenizer):
            raise ValueError(
                f"init_from: {path} has another vocabulary than the arithmetic tokenizer"
            )
        c = model.config
        self.hparams.update(
            hidden_size=c.hidden_size,
            num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            intermediate_size=c.intermediate_size,
            max_position_embeddings=c.max_position_embeddings,
        )
        return model

    def recent_loss(self) -> float:
        """Mean training loss over the last 50 steps."""
        return sum(self._losses) / len(self._losses) if self._losses else float("nan")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(**batch)
        self._losses.append(out.loss.item())
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return out.loss

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        tok = self.tokenizer
        stops = (tok.eos_token_id, tok.convert_tokens_to_ids(SEPARATOR))
        correct = exact_match(self.model, batch, stops)  # [batch]
        name = self.val_names[dataloader_idx] if self.val_names else str(dataloader_idx)
        self.log(
            f"val/acc_{name}",
            correct.float().mean(),
            batch_size=correct.numel(),
            add_dataloader_idx=False,
            prog_bar=name in ("mul_2x2", "seed_like"),
        )

    def on_validation_start(self) -> None:
        dm = self.trainer.datamodule
        self.val_names = dm.val_buckets() if isinstance(dm, ArithDataModule) else []

    def configure_optimizers(self):
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
            betas=(0.9, 0.98),
        )
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("set trainer.max_steps: the training stream is endless")
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.hparams.lr, total_steps=int(total), pct_start=self.hparams.warmup_pct
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def exact_match(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], stop_ids: Sequence[int] = ()
) -> torch.Tensor:
    """Teacher-forced exact match per row: every labelled token is the argmax.

    A labelled stop token (``</s>`` or ``;``) counts as matched when the argmax is any stop
    token, as greedy decoding stops on either. With the terminator labelled, this equals greedy
    decoding producing exactly the answer (ties aside), at the cost of one forward pass.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    pred = logits[:, :-1].argmax(-1)  # [batch seq-1]
    target = batch["labels"][:, 1:]  # [batch seq-1]
    ok = (pred == target) | (target == IGNORE)
    if stop_ids:
        stops = torch.tensor(list(stop_ids), device=pred.device)
        ok |= torch.isin(target, stops) & torch.isin(pred, stops)
    return ok.all(dim=1)  # [batch]


def export(module: ArithLM, datamodule: ArithDataModule, out_dir: str | Path, info: dict) -> Path:
    """Save the trained model the Hugging Face way: safetensors weights, config, generation
    config (stop on ``</s>`` or ``;``), tokenizer, and ``training.json`` (how it was made).

    The folder loads with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` and no tokattr code.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = module.model, module.tokenizer
    sep = tok.convert_tokens_to_ids(SEPARATOR)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, sep],
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=12,
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    # transformers 5 writes its own class name; the portable one loads in 4.x and 5.x alike.
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg.pop("backend", None)
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    stage = {
        "model": dict(module.hparams),
        "data": {**dict(datamodule.hparams), "mix": datamodule.mix},
        **info,
    }
    earlier: list[dict] = []
    init_from = module.hparams.get("init_from")
    if init_from and (Path(init_from) / "training.json").is_file():
        earlier = json.loads((Path(init_from) / "training.json").read_text())["stages"]
    record = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "stages": [*earlier, stage],
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def write_model_card(out_dir: str | Path, rows: list, eval_seed: int) -> None:
    """``README.md`` in the model folder: architecture, each training stage (command, steps,
    seeds, data mix, time), and accuracy per bucket."""
    from tokattr.accuracy import accuracy_markdown

    out = Path(out_dir)
    rec = json.loads((out / "training.json").read_text())
    stages = rec["stages"]
    m = stages[-1]["model"]
    buckets = list(dict.fromkeys(k for st in stages for k in st["data"]["mix"]))
    head = " | ".join(f"stage {i + 1}" for i in range(len(stages)))
    mix_rows = "\n".join(
        f"| {b} | " + " | ".join(f"{st['data']['mix'].get(b, 0):.2f}" for st in stages) + " |"
        for b in buckets
    )
    stage_text = []
    for i, st in enumerate(stages, start=1):
        d, sm = st["data"], st["model"]
        stage_text.append(
            f"""{i}. `{st["command"]}`: {st["steps"]} steps of {d["batch_size"]} packed chains of up
   to {d["max_len"]} tokens ({st["problems_seen"]:,} problems), seed {st["seed"]} (data stream
   seed {d["seed"]}); AdamW (weight decay {sm["weight_decay"]}), one-cycle schedule peaking at
   {sm["lr"]}; {st["train_minutes"]:.1f} min wall on {st["machine"]}; final training loss
   {st["final_loss"]:.4f} (mean of the last 50 steps)."""
        )
    total = sum(st["train_minutes"] for st in stages)
    steps = "\n".join(stage_text)
    card = f"""# arith-tiny

A small `LlamaForCausalLM` ({rec["parameters"] / 1e6:.2f}M parameters: hidden size
{m["hidden_size"]}, {m["num_layers"]} layers, {m["num_heads"]} heads, MLP {m["intermediate_size"]},
context {m["max_position_embeddings"]}) trained by tokattr on its arithmetic generator, the
reference model of the tokattr benchmark. Load it with
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`, or
`tokattr.load_model("arith-tiny")`.

## Training

Lightning, on CPU; loss on answer tokens and on the token that ends them (`;` or `</s>`)
only. Each training sequence chains several solved problems with `;`, so every problem after
the first is also a query after demonstrations. Stages, each continuing from the one before:

{steps}

Total training wall time: {total:.1f} minutes.

Data mix (weights of the query buckets):

| bucket | {head} |
|---|{"---:|" * len(stages)}
{mix_rows}

## Accuracy

Greedy exact match on fresh problems (generator seed {eval_seed}, never used in training),
measured with `tokattr eval-model --model arith-tiny`. Small buckets have few distinct
problems (two 2-digit multiplications: 8,100), so most of those also occur in training.

{accuracy_markdown(rows)}

{_shortfall_text(rows, stages)}
## Limits

Trained only on the generator's formats: integers up to 3 digits (4 with `$` amounts),
one-decimal operands, negative operands, `$A/-0.B=`. Anything else is out of distribution.
Most remaining errors are carries and borrows in the tens or hundreds digit of `+` and `-`,
the answer being written most-significant digit first.
"""
    (out / "README.md").write_text(card)


def _shortfall_text(rows: list, stages: list[dict]) -> str:
    """A paragraph naming every bar the model misses, with each stage's figure for it."""
    from tokattr.accuracy import BARS

    missed = [r for r in rows if r.bucket in BARS and r.accuracy < BARS[r.bucket]]
    if not missed:
        return ""
    lines = []
    for r in missed:
        history = ", ".join(
            f"stage {i} {st['accuracy'][r.bucket]:.1%}"
            for i, st in enumerate(stages, start=1)
            if r.bucket in st.get("accuracy", {})
        )
        lines.append(f"- `{r.bucket}`: {r.accuracy:.1%}, bar {BARS[r.bucket]:.0%} ({history}).")
    return (
        "\n**Bars not met** (the training budget, about an hour on 2 CPU cores, is spent):\n\n"
        + "\n".join(lines)
        + "\n"
    )


class TrainCLI(LightningCLI):
    """``tokattr train``: LightningCLI over :class:`ArithLM` and :class:`ArithDataModule`."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--export_dir",
            type=str | None,
            default=None,
            help="Save the trained model here (save_pretrained + tokenizer + model card).",
        )
        parser.add_argument(
            "--eval_per_bucket",
            type=int,
            default=500,
            help="Fresh problems per bucket for the model card's greedy accuracy.",
        )
        parser.add_argument(
            "--eval_seed",
            type=int,
            default=2026,
            help="Generator seed of the model card's evaluation (must differ from data.seed).",
        )


def run_training(argv: list[str]) -> int:
    """Entry point of ``tokattr train``; returns a process exit code."""
    saved_argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI reads ``args`` only
    try:
        cli = _make_cli(argv)
    finally:
        sys.argv = saved_argv
    return _fit_and_export(cli, argv)


def _make_cli(argv: list[str]) -> TrainCLI:
    return TrainCLI(
        ArithLM,
        ArithDataModule,
        run=False,
        args=argv,
        seed_everything_default=0,
        trainer_defaults={
            "max_steps": 6000,
            "val_check_interval": 1000,
            "check_val_every_n_epoch": None,
            "enable_checkpointing": False,
        },
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "tokattr train", "description": __doc__.split("\n\n")[0]},
    )


def _fit_and_export(cli: TrainCLI, argv: list[str]) -> int:
    cfg = cli.config
    if cfg.eval_seed in (cfg.data.seed, cfg.data.val_seed):
        raise SystemExit(f"--eval_seed {cfg.eval_seed} must differ from the training seeds")
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    minutes = (time.perf_counter() - start) / 60
    if cfg.export_dir and cli.trainer.is_global_zero:
        from tokattr.accuracy import accuracy_markdown, bucket_accuracy
        from tokattr.models import load_model

        dm = cli.datamodule
        info = {
            "command": "tokattr train " + " ".join(argv),
            "steps": cli.trainer.global_step,
            "seed": cfg.seed_everything,
            "problems_seen": dm.problems_seen,
            "train_minutes": minutes,
            "machine": f"{torch.get_num_threads()} CPU threads"
            if not torch.cuda.is_available()
            else torch.cuda.get_device_name(),
            "final_loss": cli.model.recent_loss(),
        }
        out = export(cli.model, dm, cfg.export_dir, info)
        lm = load_model(out)  # evaluate exactly what was saved
        rows = bucket_accuracy(lm, cfg.eval_per_bucket, cfg.eval_seed)
        record = json.loads((out / "training.json").read_text())
        record["stages"][-1]["accuracy"] = {r.bucket: r.accuracy for r in rows}
        record["stages"][-1]["eval_seed"] = cfg.eval_seed
        (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        write_model_card(out, rows, cfg.eval_seed)
        print(accuracy_markdown(rows))
        print(f"saved to {out} ({minutes:.1f} min of training)")
    return 0
