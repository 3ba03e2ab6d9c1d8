"""tokattr's AttnLRP / CP-LRP against LXT's efficient implementation, the reference code of
Achtibat et al. (2024), on a tiny seeded Llama.

LXT 2.1 does not run on transformers 5 (it imports ``transformers.modeling_attn_mask_utils``,
removed there, and its attention patch leaves a registry Llama's forward cannot use), so it
runs in an environment of its own with transformers 4.x::

    python3 -m venv .venv-lxt
    .venv-lxt/bin/pip install torch==2.13.0 'transformers==4.53.3' tabulate accelerate
    .venv-lxt/bin/pip install --no-deps lxt==2.1     # its other requirements are unused here
    TOKATTR_LXT_PYTHON=.venv-lxt/bin/python .venv/bin/python bench/attnlrp_lxt.py

That environment builds the model (seeded), saves it, and computes LXT's relevance of each
input embedding for the logit of the answer's first token; this environment loads the saved
model and computes tokattr's with ``target_fn="logit"``. Results and versions go to
``bench/results/attnlrp-lxt.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = [("12+3=", "1"), ("9 + 3 = 12;7 x 5 = 35;42-17=", "2"), ("$16,000/-0.8=", "-")]
CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)


def main() -> None:
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    import tokattr
    from tokattr.batching import encode_example
    from tokattr.data.tokenizer import build_tokenizer
    from tokattr.models import LanguageModel

    python = os.environ.get("TOKATTR_LXT_PYTHON", ".venv-lxt/bin/python")
    if not Path(python).exists():
        sys.exit(f"no LXT environment at {python} (set TOKATTR_LXT_PYTHON); see this file's doc")
    tok = build_tokenizer(128)
    folder = Path(tempfile.mkdtemp(prefix="tokattr-lxt-"))
    ids = [tok(p)["input_ids"] for p, _ in PROMPTS]
    # The answer's first token as tokattr tokenizes it, in context (no word-start marker).
    answers = [encode_example(tok, p, a).answer_ids[0] for p, a in PROMPTS]
    request = {"vocab_size": len(tok), "bos": tok.bos_token_id, "eos": tok.eos_token_id,
               "pad": tok.pad_token_id, "ids": ids, "answers": answers}  # fmt: skip
    (folder / "request.json").write_text(json.dumps(request))
    lxt_rows: dict = {}
    for variant in ("attnlrp", "cp_lrp"):
        subprocess.run([python, __file__, "--lxt", str(folder), variant], check=True, cwd=folder)
        lxt_rows.update(json.loads((folder / f"lxt-{variant}.json").read_text()))
    model = LlamaForCausalLM.from_pretrained(folder / "model").eval()
    lm = LanguageModel(model, tok, "tiny-llama-lxt", None)
    lines = [
        "# tokattr's AttnLRP / CP-LRP against LXT (efficient), tiny seeded Llama",
        "",
        f"Command: `TOKATTR_LXT_PYTHON=... .venv/bin/python bench/attnlrp_lxt.py` "
        f"(model: {CONFIG}, 3 prompts; relevance of every input token for the logit of the "
        "answer's first token).",
        "",
        f"- LXT side: {lxt_rows['versions']}",
        f"- tokattr side: transformers {transformers.__version__}, torch {torch.__version__}, "
        f"attention {model.config._attn_implementation}",
        "",
        "| variant | prompt | tokens | max abs diff | max abs LXT relevance | logit diff |",
        "|---|---|---:|---:|---:|---:|",
    ]
    worst = 0.0
    for variant in ("attnlrp", "cp_lrp"):
        for (prompt, answer), ref in zip(PROMPTS, lxt_rows[variant], strict=True):
            res = tokattr.attribute(
                lm, prompt, variant, target=answer, target_fn="logit", batch_size=1
            )
            theirs = torch.tensor(ref["relevance"])[1:]  # BOS left out, as tokattr's features
            diff = float((res.scores - theirs).abs().max())
            scale = float(theirs.abs().max())
            worst = max(worst, diff / scale)
            lines.append(
                f"| {variant} | `{prompt}` | {len(theirs)} | {diff:.2e} | {scale:.2e} | "
                f"{abs(res.target_score - ref['logit']):.1e} |"
            )
    lines += ["", f"Largest difference relative to the largest relevance: {worst:.1e}."]
    out = Path(__file__).parent / "results" / "attnlrp-lxt.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def lxt_variant(folder: Path, variant: str) -> None:
    """One variant in a fresh LXT process (LXT patches classes for the whole process)."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    _stub_vision_packages()  # after transformers has looked for them
    import lxt.efficient.models.llama as lxt_llama
    from lxt.efficient import monkey_patch

    request = json.loads((folder / "request.json").read_text())
    if not (folder / "model").exists():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=request["vocab_size"],
            num_key_value_heads=CONFIG["num_attention_heads"],
            max_position_embeddings=128,
            bos_token_id=request["bos"],
            eos_token_id=request["eos"],
            pad_token_id=request["pad"],
            **CONFIG,
        )
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():  # norms away from 1, so their rule is exercised
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
        model.save_pretrained(folder / "model")
    monkey_patch(
        modeling_llama, {"attnlrp": lxt_llama.attnLRP, "cp_lrp": lxt_llama.cp_LRP}[variant]
    )
    model = LlamaForCausalLM.from_pretrained(folder / "model", attn_implementation="eager").eval()
    rows = []
    for ids, answer in zip(request["ids"], request["answers"], strict=True):
        embeds = model.get_input_embeddings()(torch.tensor([ids])).detach().requires_grad_()
        logit = model(inputs_embeds=embeds, use_cache=False).logits[0, -1, answer]
        logit.backward()
        rows.append({"relevance": (embeds * embeds.grad)[0].sum(-1).tolist(),
                     "logit": float(logit.detach())})  # fmt: skip
    versions = {"lxt": "2.1", "transformers": transformers.__version__, "torch": torch.__version__}
    (folder / f"lxt-{variant}.json").write_text(json.dumps({variant: rows, "versions": versions}))


def _stub_vision_packages() -> None:
    """``lxt.efficient`` imports its ViT / CLIP patch maps at import time; their packages
    (torchvision, open_clip, zennit) are not needed for Llama, and PyPI's torchvision does not
    load beside the local torch build: empty stand-ins whose attributes are dummy classes."""
    import importlib.machinery
    import importlib.util
    import types

    class _Dummy(type):
        def __getattr__(cls, name: str) -> object:
            if name.startswith("__"):
                raise AttributeError(name)
            return _Dummy(name, (), {})

    class _Stub(types.ModuleType):
        def __getattr__(self, name: str) -> object:
            if name.startswith("__"):
                raise AttributeError(name)
            return _Dummy(name, (), {})

    for name in ("torchvision", "open_clip", "zennit"):
        if importlib.util.find_spec(name) is None:
            for sub in ("", ".models", ".core", ".rules", ".canonizers", ".composites"):
                mod = _Stub(name + sub)
                mod.__path__ = []  # a package: submodules resolve to stubs too
                mod.__spec__ = importlib.machinery.ModuleSpec(name + sub, None)
                sys.modules[name + sub] = mod


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--lxt":
        lxt_variant(Path(sys.argv[2]), sys.argv[3])
    else:
        main()
