"""Time Inseq on prompts, in Inseq's own virtual environment (it imports no tokattr code).

Reads one JSON request on stdin::

    {"model_path", "method", "attribute_args", "prompts", "answers", "device", "dtype",
     "threads"}

loads the model folder with ``AutoModelForCausalLM`` / ``AutoTokenizer``, runs one untimed
warm-up attribution on the first prompt, then times
``inseq.load_model(model, method, tokenizer=tok).attribute([prompt],
generated_texts=[prompt + answer], show_progress=False, **attribute_args)`` per prompt, and
prints one JSON line: ``{"status", "seconds": [per prompt], "peak_rss_bytes",
"inseq_version", "torch", "transformers"}`` (or ``{"status": "error", "reason"}``).
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
    model = AutoModelForCausalLM.from_pretrained(req["model_path"], dtype=dtype)
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
