"""Training the reference model: data packing, a few steps that lower the loss, export."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokattr.data.tokenizer import build_tokenizer
from tokattr.lightning.train import (
    IGNORE,
    ArithDataModule,
    ArithLM,
    Chain,
    ChainStream,
    encode_chain,
    export,
)


def test_chain_labels_cover_answers_and_terminators():
    tok = build_tokenizer()
    text = "9+3=12;7 x 5 = 35;$16,000/-0.8=-20000"
    spans = ((4, 6), (15, 17), (31, 37))
    row = encode_chain(Chain(text, spans), tok)
    toks = tok.convert_ids_to_tokens(row["input_ids"])
    predicted = [t for t, lab in zip(toks, row["labels"], strict=True) if lab != IGNORE]
    assert predicted == ["1", "2", ";", "3", "5", ";", "-", "2", "0", "0", "0", "0", "</s>"]
    kept = [lab for lab in row["labels"] if lab != IGNORE]
    assert kept == tok.convert_tokens_to_ids(predicted)


def test_chain_stream_packs_and_is_seeded():
    tok = build_tokenizer()
    a = ChainStream(tok, seed=0, mix={"add": 1.0}, max_len=48)
    b = ChainStream(tok, seed=0, mix={"add": 1.0}, max_len=48)
    rows_a = [r for _, r in zip(range(20), a, strict=False)]
    rows_b = [r for _, r in zip(range(20), b, strict=False)]
    assert rows_a == rows_b
    assert all(len(r["input_ids"]) <= 48 for r in rows_a)
    assert sum(len(r["input_ids"]) for r in rows_a) / 20 > 36  # packed, not one problem each
    assert a.next_index > 60


def test_a_few_steps_lower_the_loss(tmp_path):
    L.seed_everything(0)
    module = ArithLM(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, lr=3e-3)
    data = ArithDataModule(batch_size=16, max_len=48, val_per_bucket=4)
    trainer = L.Trainer(
        max_steps=60,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    first = []
    module.training_step = _recording(module.training_step, first)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 60
    start, end = sum(first[:5]) / 5, sum(first[-5:]) / 5
    assert end < 0.7 * start, (start, end)

    out = export(module, data, tmp_path / "model", {"steps": 60})
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("12+7=", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, module.model(ids).logits)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok.convert_tokens_to_ids(";") in model.generation_config.eos_token_id
    record = json.loads((out / "training.json").read_text())
    (stage,) = record["stages"]
    assert stage["model"]["hidden_size"] == 32 and stage["data"]["max_len"] == 48

    # A second stage starts from exactly these weights and records both stages.
    again = ArithLM(init_from=str(out), hidden_size=999, num_heads=1)
    assert again.hparams.hidden_size == 32
    assert again.model.training  # Lightning would otherwise train it in eval mode
    again.model.eval()
    torch.testing.assert_close(again.model(ids).logits, module.model(ids).logits)
    out2 = export(again, data, tmp_path / "model2", {"steps": 0})
    assert len(json.loads((out2 / "training.json").read_text())["stages"]) == 2


def test_init_from_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="init_from: no model folder"):
        ArithLM(init_from=str(tmp_path / "missing"))


def _recording(step, sink):
    def wrapped(batch, batch_idx):
        loss = step(batch, batch_idx)
        sink.append(loss.item())
        return loss

    return wrapped
