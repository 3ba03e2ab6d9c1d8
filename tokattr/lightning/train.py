"""Training the reference model ``arith-tiny`` (Lightning layer: imports ``lightning``).

``tokattr train --config configs/train/arith_tiny.yaml`` fits :class:`ArithLM` on
:class:`ArithDataModule`, then saves the model with ``save_pretrained`` (safetensors), its
tokenizer, and a model card with greedy exact-match accuracy per bucket on fresh problems.

The training data (packed chains of solved problems) is :mod:`tokattr.lightning.train_data`;
the exact-match check, the export and the model card are :mod:`tokattr.lightning.export`.
Their names are importable from here too.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import deque
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from transformers import LlamaConfig, LlamaForCausalLM

from tokattr.data.arithmetic import SEPARATOR
from tokattr.data.tokenizer import build_tokenizer
from tokattr.lightning.export import exact_match, export, write_model_card
from tokattr.lightning.lookup_data import LookupDataModule
from tokattr.lightning.train_data import (
    IGNORE,
    ArithDataModule,
    Chain,
    ChainStream,
    collate,
    encode_chain,
)

__all__ = [
    "IGNORE",
    "ArithDataModule",
    "ArithLM",
    "Chain",
    "ChainStream",
    "LookupDataModule",
    "TrainCLI",
    "collate",
    "encode_chain",
    "exact_match",
    "export",
    "run_training",
    "write_model_card",
]


class ArithLM(L.LightningModule):
    """A small ``LlamaForCausalLM`` trained with AdamW and a one-cycle or constant schedule.

    Args:
        hidden_size: model width.
        num_layers: decoder layers.
        num_heads: attention heads (``hidden_size`` must divide by it).
        intermediate_size: MLP width.
        max_position_embeddings: context length (RoPE; also the tokenizer's max length).
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_pct: fraction of steps spent warming up.
        schedule: ``"one_cycle"`` (cosine warm-up to ``lr``, then annealing; ``arith-tiny``)
            or ``"constant"`` (linear warm-up, then ``lr`` to the end: the lookup model,
            whose induction circuit forms after a plateau whose length is not known ahead,
            so a schedule that anneals on a fixed budget can end before it forms).
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
        schedule: str = "one_cycle",
    ) -> None:
        super().__init__()
        if schedule not in ("one_cycle", "constant"):
            raise ValueError(f"schedule must be 'one_cycle' or 'constant', got {schedule!r}")
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
            prog_bar=name in ("mul_2x2", "seed_like", "lookup"),
        )

    def on_validation_start(self) -> None:
        dm = self.trainer.datamodule
        buckets = getattr(dm, "val_buckets", None)
        self.val_names = buckets() if callable(buckets) else []

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
        if self.hparams.get("schedule", "one_cycle") == "constant":
            warm = max(1, round(self.hparams.warmup_pct * total))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        else:
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt,
                max_lr=self.hparams.lr,
                total_steps=int(total),
                pct_start=self.hparams.warmup_pct,
            )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class TrainCLI(LightningCLI):
    """``tokattr train``: LightningCLI over :class:`ArithLM` and a data module given by its
    ``class_path``: :class:`ArithDataModule` (``arith-tiny``) or
    :class:`~tokattr.lightning.lookup_data.LookupDataModule` (``lookup-tiny``)."""

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
        L.LightningDataModule,
        subclass_mode_data=True,
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
    data_args = cfg.data.init_args
    if cfg.eval_seed in (data_args.seed, data_args.val_seed):
        raise SystemExit(f"--eval_seed {cfg.eval_seed} must differ from the training seeds")
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    minutes = (time.perf_counter() - start) / 60
    if cfg.export_dir and cli.trainer.is_global_zero:
        from tokattr.accuracy import accuracy_markdown
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
        rows = dm.card_accuracy(lm, cfg.eval_per_bucket, cfg.eval_seed)
        record = json.loads((out / "training.json").read_text())
        record["stages"][-1]["accuracy"] = {r.bucket: r.accuracy for r in rows}
        record["stages"][-1]["eval_seed"] = cfg.eval_seed
        (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        write_model_card(out, rows, cfg.eval_seed, dm.card_text())
        print(accuracy_markdown(rows))
        print(f"saved to {out} ({minutes:.1f} min of training)")
    return 0
