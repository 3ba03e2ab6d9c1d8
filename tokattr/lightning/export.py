"""The trained reference model checked and saved: teacher-forced exact match, the Hugging
Face folder (:func:`export`) and its model card (:func:`write_model_card`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig

from tokattr.data.arithmetic import SEPARATOR
from tokattr.lightning.train_data import IGNORE, ArithDataModule

if TYPE_CHECKING:
    from tokattr.lightning.train import ArithLM


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


@dataclass(frozen=True)
class CardText:
    """What a model card says that depends on the data set: the model's name, what it does
    and where it is used, how the training sequences look, what the accuracy rows are, and
    its limits (markdown)."""

    name: str
    about: str
    training: str
    accuracy: str
    limits: str


ARITH_CARD = CardText(
    name="arith-tiny",
    about="trained by tokattr on its arithmetic generator, the reference model of the tokattr "
    "benchmark",
    training="Lightning, on CPU; loss on answer tokens and on the token that ends them (`;` or "
    "`</s>`) only. Each training sequence chains several solved problems with `;`, so every "
    "problem after the first is also a query after demonstrations.",
    accuracy="Small buckets have few distinct problems (two 2-digit multiplications: 8,100), so "
    "most of those also occur in training.",
    limits="Trained only on the generator's formats: integers up to 3 digits (4 with `$` "
    "amounts), one-decimal operands, negative operands, `$A/-0.B=`. Anything else is out of "
    "distribution. Most remaining errors are carries and borrows in the tens or hundreds digit "
    "of `+` and `-`, the answer being written most-significant digit first.",
)


def write_model_card(
    out_dir: str | Path, rows: list, eval_seed: int, text: CardText = ARITH_CARD
) -> None:
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
    mix_table = (
        f"""
Data mix (weights of the query buckets):

| bucket | {head} |
|---|{"---:|" * len(stages)}
{mix_rows}
"""
        if len(buckets) > 1
        else ""
    )
    stage_text = []
    for i, st in enumerate(stages, start=1):
        d, sm = st["data"], st["model"]
        shape = (
            f"packed chains of up to {d['max_len']} tokens"
            if "max_len" in d
            else f"sequences of {d.get('pairs')} definitions and {d.get('queries')} queries"
        )
        if d.get("length"):
            (lo, hi), (f_lo, f_hi) = d["length"], d["filler"]
            shape += f" among passages of {f_lo}-{f_hi} digits ({lo}-{hi} tokens)"
        if d.get("warmup_mix"):
            shape += f", {d['warmup_mix']:.0%} of them repeated random strings"
        if sm.get("schedule", "one_cycle") == "constant":
            schedule = (
                f"linear warm-up over {sm['warmup_pct']:.0%} of the steps to {sm['lr']}, "
                "then constant"
            )
        else:
            schedule = f"one-cycle schedule peaking at {sm['lr']}"
        stage_text.append(
            f"""{i}. `{st["command"]}`: {st["steps"]} steps of {d["batch_size"]} {shape}
   ({st["problems_seen"]:,} problems), seed {st["seed"]} (data stream seed {d["seed"]}); AdamW
   (weight decay {sm["weight_decay"]}), {schedule};
   {st["train_minutes"]:.1f} min wall on {st["machine"]}; final training loss
   {st["final_loss"]:.4f} (mean of the last 50 steps)."""
        )
    total = sum(st["train_minutes"] for st in stages)
    steps = "\n".join(stage_text)
    card = f"""# {text.name}

A small `LlamaForCausalLM` ({rec["parameters"] / 1e6:.2f}M parameters: hidden size
{m["hidden_size"]}, {m["num_layers"]} layers, {m["num_heads"]} heads, MLP {m["intermediate_size"]},
context {m["max_position_embeddings"]}) {text.about}. Load it with
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`, or
`tokattr.load_model("{text.name}")`.

## Training

{text.training} Stages, each continuing from the one before:

{steps}

Total training wall time: {total:.1f} minutes.
{mix_table}
## Accuracy

Greedy exact match on fresh problems (generator seed {eval_seed}, never used in training),
measured with `tokattr eval-model --model {text.name}`. {text.accuracy}

{accuracy_markdown(rows)}

{_shortfall_text(rows, stages)}
## Limits

{text.limits}
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
        "\n**Bars not met** (the training budget on 2 CPU cores is spent):\n\n"
        + "\n".join(lines)
        + "\n"
    )
