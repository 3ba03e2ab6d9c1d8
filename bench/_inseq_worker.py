"""Time Inseq on prompts, in Inseq's own virtual environment (it imports no tokattr code).

Reads one JSON request on stdin::

    {"model_path", "method", "attribute_args", "prompts", "answers", "device", "dtype",
     "threads"}

loads the model folder with ``AutoModelForCausalLM`` / ``AutoTokenizer``, runs one untimed
warm-up attribution on the first prompt, then times
``inseq.load_model(model, method, tokenizer=tok).attribute([prompt],
generated_texts=[prompt + answer], show_progress=False, **attribute_args)`` per prompt, and
prints one JSON line: ``{"status", "seconds": [per prompt], "peak_bytes",
"inseq_version", "torch", "transformers"}`` (or ``{"status": "error", "reason"}``).

Two adapters let Inseq 0.7.1 (written for transformers 4) run ``attention`` and
``value_zeroing`` under transformers 5; neither changes the weights or what Inseq computes:

- ``attention``: the model is loaded with ``attn_implementation="eager"``. transformers 5
  defaults to SDPA, which returns no attention weights, so Inseq's
  ``torch.stack(output.attentions)`` failed on an empty list. Eager and SDPA compute the same
  softmax attention (tokattr's ``attention`` switches to eager for the same reason).
- ``value_zeroing``: transformers 5 decoder layers return the hidden-state tensor, not a
  tuple; Inseq's hook that stores a layer's (value-zeroed) output and passes the clean output
  on indexes ``output[0]`` and rebuilds a tuple (``Tensor + tuple`` failed).
  :func:`_adapt_value_zeroing` wraps that hook: for a tensor output it does the same thing
  (store ``output`` as the corrupted state, return the clean state in its place); tuple
  outputs still go to Inseq's own hook.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def _rss() -> tuple[int | None, int | None]:
    # A copy of bench._harness.rss_bytes: this worker runs in Inseq's own environment, which
    # has neither tokattr nor the bench package.
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None, None
    rss = re.search(r"VmRSS:\s+(\d+) kB", status)
    hwm = re.search(r"VmHWM:\s+(\d+) kB", status)
    return (
        int(rss.group(1)) * 1024 if rss else None,
        int(hwm.group(1)) * 1024 if hwm else None,
    )


def _adapt_value_zeroing() -> None:
    """Make Inseq's value-zeroing block hook accept decoder layers that return a tensor
    (transformers 5) as well as a tuple (transformers 4); same states stored and patched."""
    import torch
    from inseq.attr.feat.ops.value_zeroing import ValueZeroing

    original = ValueZeroing.get_states_extract_and_patch_hook
    if getattr(original, "_tokattr_adapted", False):
        return

    def get_hook(self: Any, block_idx: int, hidden_state_idx: int = 0) -> Any:
        tuple_hook = original(self, block_idx, hidden_state_idx)

        def hook(module: Any, args: Any, output: Any) -> Any:
            if not isinstance(output, torch.Tensor):
                return tuple_hook(module, args, output)
            self.corrupted_block_output_states[block_idx] = output.clone().float().detach().cpu()
            return self.clean_block_output_states[block_idx].to(output.device)

        return hook

    get_hook._tokattr_adapted = True  # type: ignore[attr-defined]
    ValueZeroing.get_states_extract_and_patch_hook = get_hook


def main() -> dict[str, Any]:
    """Run the request from stdin; the answer as a dict."""
    req = json.loads(sys.stdin.read())
    import torch

    torch.set_num_threads(int(req.get("threads") or torch.get_num_threads()))
    import inseq
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if req["dtype"] == "bf16" else torch.float32
    tok = AutoTokenizer.from_pretrained(req["model_path"])
    load_kwargs: dict[str, Any] = {}
    if req["method"] == "attention":
        load_kwargs["attn_implementation"] = "eager"  # SDPA returns no attention weights
    if req["method"] == "value_zeroing":
        _adapt_value_zeroing()
    model = AutoModelForCausalLM.from_pretrained(req["model_path"], dtype=dtype, **load_kwargs)
    model = model.to(req["device"]).eval()
    attr_model = inseq.load_model(model, req["method"], tokenizer=tok)
    args = dict(req.get("attribute_args") or {})
    prompts, answers = req["prompts"], req["answers"]

    def one(prompt: str, answer: str) -> None:
        attr_model.attribute(
            [prompt], generated_texts=[prompt + answer], show_progress=False, **args
        )
        if req["device"] == "cuda":
            torch.cuda.synchronize()

    one(prompts[0], answers[0])  # warm-up
    start_rss = _rss()[0]
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if req["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start_cuda = torch.cuda.memory_allocated()
    seconds = []
    for prompt, answer in zip(prompts, answers, strict=True):
        t0 = time.perf_counter()
        one(prompt, answer)
        seconds.append(time.perf_counter() - t0)
    if req["device"] == "cuda":
        peak = torch.cuda.max_memory_allocated() - start_cuda
    else:
        hwm = _rss()[1]
        peak = None if hwm is None or start_rss is None else max(0, hwm - start_rss)
    try:
        from importlib.metadata import version

        inseq_version = version("inseq")
    except Exception:
        inseq_version = "unknown"
    return {
        "status": "ok",
        "seconds": seconds,
        "peak_bytes": peak,
        "inseq_version": inseq_version,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


if __name__ == "__main__":
    try:
        answer = main()
    except Exception as exc:
        traceback.print_exc()
        answer = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:2000]}
    print(json.dumps(answer), flush=True)
