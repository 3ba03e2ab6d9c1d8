"""Peak memory of one method on one long prompt, in a fresh process.

Reads one JSON request on stdin::

    {"model_path", "prompt", "answer", "n_steps", "batch_size", "memory_budget",
     "device", "dtype", "threads", ["method", "params"]}

loads the model folder, records the memory after loading, runs ``tokattr.attribute(lm,
prompt, method, target=answer, batch_size=..., **params)`` (``method`` defaults to
``integrated_gradients`` with ``n_steps``; passing ``memory_budget=`` when the request gives
one; ``method="forward"`` times one forward pass of the prompt and answer instead, and
``"forward_backward"`` one forward and backward pass w.r.t. the input embeddings: the floors
a method's time is compared with; ``"warmup": true`` runs it once on a 4-token prompt first,
so that first-call costs stay off the record), and
prints one JSON line with the peak memory above the loaded model: CUDA
``max_memory_allocated`` or, on CPU, the peak RSS (``ru_maxrss``, KiB on Linux) minus the RSS
after loading (the peak is reset after loading through ``/proc/self/clear_refs`` where
Linux allows it).
"""

from __future__ import annotations

import json
import re
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def _status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in bytes, ``None`` off Linux."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"{field}:\s+(\d+) kB", status)
    return int(m.group(1)) * 1024 if m else None


def _reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0), so the peak of loading the
    model (which can briefly hold two copies) does not count; ``False`` where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main() -> dict[str, Any]:
    """Run the request from stdin; the answer as a dict."""
    req = json.loads(sys.stdin.read())
    import torch

    torch.set_num_threads(int(req.get("threads") or torch.get_num_threads()))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tokattr
    from tokattr.models import LanguageModel

    dtype = torch.bfloat16 if req["dtype"] == "bf16" else torch.float32
    device = req["device"]
    model = AutoModelForCausalLM.from_pretrained(req["model_path"], dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(req["model_path"])
    lm = LanguageModel(model=model, tokenizer=tok, name="llama-100m", path=None)

    method = req.get("method") or "integrated_gradients"
    kwargs: dict[str, Any] = {"batch_size": req["batch_size"], **(req.get("params") or {})}
    if method == "integrated_gradients" and req.get("n_steps") is not None:
        kwargs["n_steps"] = int(req["n_steps"])
    used_budget = req.get("memory_budget") is not None
    if used_budget:
        kwargs["memory_budget"] = int(req["memory_budget"])
    if req.get("warmup"):  # first-call costs (imports, kernels, allocator) off the record
        short = tok("1+1=2", return_tensors="pt")["input_ids"].to(device)
        with torch.inference_mode():
            model(input_ids=short)
        if method not in ("forward", "forward_backward"):
            # Character spans are the long prompt's: the short one takes the default.
            warm = {k: v for k, v in kwargs.items() if k != "features" or isinstance(v, str)}
            tokattr.attribute(lm, "1+1=", method=method, target="2", **warm)
    reset = False
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        reset = _reset_peak_rss()
        start = _status_bytes("VmRSS") or 0
    t0 = time.perf_counter()
    bare = method in ("forward", "forward_backward")
    if bare:  # the fastest of a few, so one slow call does not set the floor
        ids = tok(req["prompt"] + req["answer"], return_tensors="pt")["input_ids"].to(device)
        times = []
        for _ in range(3 if method == "forward" else 2):
            t1 = time.perf_counter()
            if method == "forward":
                with torch.inference_mode():
                    model(input_ids=ids)
            else:  # as the benchmark's floor: a backward pass w.r.t. the input embeddings
                x = model.get_input_embeddings()(ids).detach().requires_grad_()
                logits = model(inputs_embeds=x, use_cache=False).logits
                torch.autograd.grad(logits[:, -1].float().logsumexp(-1).sum(), x)
                del logits
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t1)
        out = None
    else:
        out = tokattr.attribute(lm, req["prompt"], method=method, target=req["answer"], **kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = min(times) if bare else time.perf_counter() - t0
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - start
        kind = "cuda_max_memory_allocated"
    else:
        hwm = _status_bytes("VmHWM") if reset else None
        if hwm is None:  # ru_maxrss: KiB on Linux, since the process started
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = hwm - start
        kind = "cpu_peak_rss_minus_rss_after_load" + ("" if reset else " (peak since start)")
    n_tokens = len(tok(req["prompt"])["input_ids"])
    from tokattr.attribution import GRADIENT_METHODS
    from tokattr.engine.checkpoint import needs_checkpointing

    total = len(tok(req["prompt"] + req["answer"])["input_ids"])
    checkpointed = (
        method in GRADIENT_METHODS
        and used_budget
        and needs_checkpointing(model, total, int(req["memory_budget"]), total - n_tokens + 1)
    )
    return {
        "status": "ok",
        "seconds": seconds,
        "peak_bytes": int(peak),
        "memory_kind": kind,
        "prompt_tokens": n_tokens,
        "model_evals": 1 if out is None else out.model_evals,
        "delta": None if out is None else out.delta,
        "used_memory_budget_arg": used_budget,
        "checkpointed": bool(checkpointed),
    }


if __name__ == "__main__":
    try:
        answer = main()
    except Exception as exc:
        traceback.print_exc()
        answer = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:2000]}
    print(json.dumps(answer), flush=True)
