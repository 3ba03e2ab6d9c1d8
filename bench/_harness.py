"""The benchmark's machinery: settings, models, prompts, floors, peers and the results store.

Everything here is plain Python; ``conftest.py`` wires it into pytest and ``test_perf.py``
times it with pytest-benchmark.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tokattr.allocator import malloc_env
from tokattr.batching import TokenBatch, collate, encode_example
from tokattr.data.arithmetic import ArithmeticGenerator, with_demonstrations
from tokattr.data.tokenizer import build_tokenizer
from tokattr.models import BUNDLED, LanguageModel
from tokattr.validation import method_parameters

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
INSEQ_PYTHON = Path(
    os.environ.get("TOKATTR_BENCH_INSEQ_PYTHON") or REPO / ".venv-inseq" / "bin" / "python"
)
SEED = 0
"""The seed of every random method (tokattr's ``seed=``; Captum: ``torch.manual_seed``)."""

# ---------------------------------------------------------------------------- settings

BENCH_PARAMS: dict[str, dict[str, Any]] = {
    "occlusion": {},
    "shapley_sampling": {"n_samples": 25},
    "kernel_shap": {"n_samples": 200},
    "integrated_gradients": {"n_steps": 50},
    "saliency": {},
    "input_x_gradient": {},
    "exact_shapley": {},
    "gradient_shap": {"n_samples": 20},
    "smoothgrad": {"base": "saliency", "n_samples": 20},
    "vargrad": {"base": "saliency", "n_samples": 20},
    "lime": {"n_samples": 200},
    "attention": {},
    "attention_rollout": {},
    "value_zeroing": {},
    "attnlrp": {},
    "cp_lrp": {},
}
"""Method -> the benchmark's hyper-parameters (occlusion: window 1). ``random`` is not timed: it
puts nothing through the model."""

GRADIENT_METHODS = frozenset({"integrated_gradients", "saliency", "input_x_gradient"})

MODELS = ("arith-tiny", "llama-100m")
LENGTHS = (16, 64, 256)
"""Prompt lengths (tokens, BOS included) of the ``llama-100m`` prompt sets."""
ARITH_SET = "arith32"
ARITH_PROMPTS = 32
MEMORY_LENGTH = 1024

PEERS: dict[str, tuple[str, ...]] = {
    "occlusion": ("captum", "inseq"),
    "shapley_sampling": ("captum",),
    "kernel_shap": ("captum",),
    "integrated_gradients": ("captum", "inseq"),
    "saliency": ("inseq",),
    "input_x_gradient": ("captum", "inseq"),
    "exact_shapley": (),
    "gradient_shap": ("captum",),
    "smoothgrad": ("captum",),
    "vargrad": ("captum",),
    "lime": ("captum",),
    "attention": ("inseq",),
    "attention_rollout": (),
    "value_zeroing": ("inseq",),
    "attnlrp": (),
    "cp_lrp": (),
}
"""Method -> the peers that have it (LXT, the only AttnLRP, does not run on transformers 5:
``bench/results/attnlrp-lxt.md``). Captum's exact ``ShapleyValues`` enumerates all n!
permutations (not 2^n coalitions), so it is no peer for ``exact_shapley``."""

EQUALITY_TOLERANCE: dict[str, float] = {
    "occlusion": 1e-4,
    "shapley_sampling": 1e-4,
    "kernel_shap": 1e-2,
    "integrated_gradients": 1e-3,
    "input_x_gradient": 1e-4,
    "gradient_shap": 1e-3,
    "smoothgrad": 1e-3,
    "vargrad": 1e-3,
    "lime": 1e-2,
}
"""Relative tolerance (max |tokattr - captum| / max |captum|) of the Captum equality checks
in float32. kernel_shap is loose: Captum fits scikit-learn's LinearRegression, tokattr an
exact float64 least squares; lime too (scikit-learn's Lasso stops at its default tolerance,
tokattr's coordinate descent runs to convergence). bfloat16 runs use ``BF16_TOLERANCE`` for
every method."""
BF16_TOLERANCE = 5e-2

QUICK_LLAMA_PARAMS: dict[int, dict[str, dict[str, Any] | None]] = {
    16: {},
    64: {
        "shapley_sampling": {"n_samples": 2},
        "kernel_shap": {"n_samples": 50},
        "integrated_gradients": {"n_steps": 16},
    },
    256: {
        "shapley_sampling": {"n_samples": 1},
        "kernel_shap": {"n_samples": 16},
        "integrated_gradients": {"n_steps": 8},
    },
}
"""Quick scale, ``llama-100m``: overrides of the standard settings per prompt length (``None``
would skip the method). 2 cores cost ~0.1-1 s per 64-256-token sequence of this model."""
QUICK_LLAMA_PROMPTS = {16: 2, 64: 2, 256: 1}
FULL_LLAMA_PROMPTS = 32


@dataclass(frozen=True)
class BenchConfig:
    """One session's settings (from the pytest options, see ``conftest.py``)."""

    scale: str  # quick | full
    dtype: str  # fp32 | bf16
    device: str  # cpu | cuda
    name: str  # results file stem
    peers: tuple[str, ...]  # captum, inseq
    batch_size: int | None  # tokattr's batch_size (None: tokattr's default)
    fresh: bool  # drop the rows of earlier sessions
    peer_budget_s: float  # estimated seconds above which a peer runs on fewer prompts
    memory_budget_bytes: int
    floor_call_cap_s: float  # stop growing the floor's batch once one call takes this long
    floor_memory_cap_bytes: int  # estimated activation memory cap of the floor's batches

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32

    def llama_prompts(self, length: int) -> int:
        """How many prompts of ``length`` tokens ``llama-100m`` runs on."""
        if self.scale == "full":
            return FULL_LLAMA_PROMPTS
        return QUICK_LLAMA_PROMPTS.get(length, 1)

    def method_params(self, model: str, prompt_set: str, method: str) -> dict[str, Any] | None:
        """The method's hyper-parameters for this case (``None``: not run at this scale)."""
        params = dict(BENCH_PARAMS[method])
        if model == "llama-100m" and self.scale == "quick":
            override = QUICK_LLAMA_PARAMS.get(set_length(prompt_set), {})
            if method in override:
                if override[method] is None:
                    return None
                params.update(override[method] or {})
        return params

    def memory_case(self) -> tuple[int, tuple[int, int]]:
        """``(n_steps, (small chunk, large chunk))`` of the 1,024-token IG memory case."""
        if self.scale == "full":
            return 50, (4, 16)
        return 8, (1, 2)


def default_config(
    scale: str | None = None,
    dtype: str | None = None,
    name: str | None = None,
    peers: str | None = None,
    batch_size: int | None = None,
    fresh: bool = False,
    peer_budget_s: float | None = None,
    memory_budget_gib: float | None = None,
) -> BenchConfig:
    """A :class:`BenchConfig`, options first, then ``$TOKATTR_BENCH_*``, then defaults."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scale = (
        scale or os.environ.get("TOKATTR_BENCH_SCALE") or ("full" if device == "cuda" else "quick")
    )
    dtype = dtype or os.environ.get("TOKATTR_BENCH_DTYPE") or "fp32"
    if scale not in ("quick", "full"):
        raise ValueError(f"bench scale must be quick or full, got {scale!r}")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"bench dtype must be fp32 or bf16, got {dtype!r}")
    name = name or os.environ.get("TOKATTR_BENCH_NAME") or f"{device}-{dtype}"
    peer_text = (
        peers if peers is not None else os.environ.get("TOKATTR_BENCH_PEERS", "captum,inseq")
    )
    peer_list = tuple(p for p in (s.strip() for s in peer_text.split(",")) if p and p != "none")
    unknown = set(peer_list) - {"captum", "inseq"}
    if unknown:
        raise ValueError(f"unknown peer(s) {sorted(unknown)}; choose from captum, inseq, none")
    if peer_budget_s is None:
        peer_budget_s = 120.0 if scale == "quick" else 3600.0
    if memory_budget_gib is None:
        memory_budget_gib = 2.5 if device == "cpu" else 8.0
    if device == "cuda":
        floor_mem = int(torch.cuda.get_device_properties(0).total_memory * 0.5)
    else:
        floor_mem = 4 << 30
    return BenchConfig(
        scale=scale,
        dtype=dtype,
        device=device,
        name=name,
        peers=peer_list,
        batch_size=batch_size,
        fresh=fresh,
        peer_budget_s=peer_budget_s,
        memory_budget_bytes=int(memory_budget_gib * (1 << 30)),
        floor_call_cap_s=5.0 if scale == "quick" else 30.0,
        floor_memory_cap_bytes=floor_mem,
    )


def set_length(prompt_set: str) -> int:
    """The token count of a ``len<N>`` prompt set (0 for the arithmetic set)."""
    m = re.fullmatch(r"len(\d+)", prompt_set)
    return int(m.group(1)) if m else 0


def prompt_sets(model: str) -> tuple[str, ...]:
    """The prompt sets a model is timed on."""
    return (ARITH_SET,) if model == "arith-tiny" else tuple(f"len{n}" for n in LENGTHS)


def model_methods(model: str) -> tuple[str, ...]:
    """The methods timed on a model (exact Shapley only on the bundled model's short prompts)."""
    return tuple(m for m in BENCH_PARAMS if model == "arith-tiny" or m != "exact_shapley")


PREFIX_REUSE_METHODS = ("occlusion", "kernel_shap", "shapley_sampling", "exact_shapley")
"""The methods also timed with ``prefix_reuse=False`` (``tokattr-full_sequences``)."""


def prefix_reuse_supported(method: str = "occlusion") -> bool:
    """Whether tokattr's ``method`` takes ``prefix_reuse``."""
    return "prefix_reuse" in method_parameters(method)


def implementations(method: str) -> tuple[str, ...]:
    """Every implementation a method is timed in, tokattr's first (the peers compare to it)."""
    own = ["tokattr"]
    if method in PREFIX_REUSE_METHODS:
        own.append("tokattr-full_sequences")
    return (*own, *PEERS[method])


# ---------------------------------------------------------------------------- models

LLAMA_SHAPE = dict(
    hidden_size=768,
    intermediate_size=2560,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=12,
    max_position_embeddings=2048,
)
"""``llama-100m``: 12 x (4 * 768^2 attention + 3 * 768 * 2560 MLP) ~ 99M parameters; the
bundled tokenizer's ~160-token vocabulary adds almost nothing."""


def build_llama_100m(seed: int = 0, max_positions: int | None = None) -> LanguageModel:
    """The random-weight ~100M-parameter Llama on the bundled tokenizer (eval mode, CPU);
    ``max_positions`` (default 2,048) sets the model's and the tokenizer's longest sequence
    (rotary positions: the weights do not depend on it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(LLAMA_SHAPE)
    if max_positions is not None:
        shape["max_position_embeddings"] = max_positions
    tok = build_tokenizer(model_max_length=shape["max_position_embeddings"])
    config = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        **shape,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return LanguageModel(model=model.eval(), tokenizer=tok, name="llama-100m", path=None)


def parameter_count(lm: LanguageModel) -> int:
    return sum(p.numel() for p in lm.model.parameters())


def place(lm: LanguageModel, config: BenchConfig) -> LanguageModel:
    """The model on the session's device and dtype (same object when already there)."""
    lm.model.to(device=config.device, dtype=config.torch_dtype)
    return lm


@functools.cache
def _saved_llama_dir() -> Path:
    """``llama-100m`` saved once per process (for the Inseq and memory workers)."""
    folder = Path(tempfile.mkdtemp(prefix="tokattr-bench-llama-100m-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    lm = build_llama_100m()
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def model_folder(model: str) -> Path:
    """A folder ``from_pretrained`` loads the model from (same weights as in-process)."""
    return BUNDLED["arith-tiny"] if model == "arith-tiny" else _saved_llama_dir()


# ---------------------------------------------------------------------------- prompts


def arith_prompts(n: int = ARITH_PROMPTS) -> list[tuple[str, str]]:
    """``(prompt, answer)`` of problems 0..n-1 of ``ArithmeticGenerator(seed=4242)``."""
    return [(p.prompt, p.answer) for p in ArithmeticGenerator(seed=4242).take(n)]


def length_prompts(tokenizer: Any, length: int, count: int) -> list[tuple[str, str]]:
    """``count`` prompts of exactly ``length`` tokens (BOS included): solved arithmetic
    demonstrations joined with ``;`` before a query, cut from the left to the length."""
    gen = ArithmeticGenerator(seed=4242 + length)
    out: list[tuple[str, str]] = []
    start = 0
    while len(out) < count:
        if start > 100_000:
            raise RuntimeError(f"could not build {count} prompts of {length} tokens")
        demos: list[str] = []
        chars = 0
        while chars < 2 * length + 16:  # >= 1 char per token
            p = gen.problem(start + len(demos))
            demos.append(p.prompt + p.answer)
            chars += len(demos[-1]) + 1
        query = gen.problem(start + len(demos))
        start += len(demos) + 1
        text = with_demonstrations(demos, query.prompt)

        def n_tokens(t: str) -> int:
            return len(tokenizer(t)["input_ids"])

        while len(text) > 1 and n_tokens(text) > length:
            text = text[1:]
        if n_tokens(text) != length:
            continue
        try:
            encode_example(tokenizer, text, query.answer)
        except ValueError:
            continue
        out.append((text, query.answer))
    return out


def token_batch(lm: LanguageModel, prompts: Sequence[tuple[str, str]]) -> TokenBatch:
    """The padded batch tokattr builds for these prompts (``encode_example`` + ``collate``)."""
    encoded = [encode_example(lm.tokenizer, p, a, None, lm.max_length) for p, a in prompts]
    return collate(lm.tokenizer, encoded)


def answer_ids(lm: LanguageModel, prompt: str, answer: str) -> list[int]:
    """The answer's token ids as tokattr scores them (after the prompt's tokens)."""
    return encode_example(lm.tokenizer, prompt, answer, None, lm.max_length).answer_ids


# ---------------------------------------------------------------------------- floors


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Floor:
    """Per-sequence cost of a bare forward and a forward + backward on one padded batch."""

    seq_len: int
    forward_s: float  # the fastest per-sequence seconds over batch sizes
    forward_batch: int
    backward_s: float  # forward + backward w.r.t. inputs_embeds
    backward_batch: int
    forward_b1_s: float  # at batch size 1 (what one-sequence-per-call peers pay)
    backward_b1_s: float
    table: dict[str, dict[int, float]] = field(default_factory=dict)  # kind -> bs -> s/seq
    stopped: dict[str, str] = field(default_factory=dict)  # kind -> why the sweep ended

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "forward_s_per_seq": self.forward_s,
            "forward_best_batch": self.forward_batch,
            "forward_backward_s_per_seq": self.backward_s,
            "forward_backward_best_batch": self.backward_batch,
            "forward_s_per_seq_batch1": self.forward_b1_s,
            "forward_backward_s_per_seq_batch1": self.backward_b1_s,
            "per_batch_size": {k: {str(b): s for b, s in v.items()} for k, v in self.table.items()},
            "sweep_stopped": self.stopped,
        }


FLOOR_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _activation_bytes(lm: LanguageModel, tokens: int, grad: bool, dtype: torch.dtype) -> int:
    """A rough upper estimate of the activation memory of ``tokens`` tokens."""
    cfg = lm.model.config
    hidden = getattr(cfg, "hidden_size", 256)
    inter = getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden
    layers = getattr(cfg, "num_hidden_layers", 1)
    vocab = getattr(cfg, "vocab_size", 1)
    size = torch.finfo(dtype).bits // 8
    per_token = layers * (20 * hidden + 4 * inter) if grad else 6 * hidden + 3 * inter
    return tokens * (per_token + 2 * vocab) * size


def measure_floor(lm: LanguageModel, batch: TokenBatch, config: BenchConfig) -> Floor:
    """Time a bare forward (no_grad) and a forward + backward w.r.t. ``inputs_embeds`` on the
    padded prompt batch replicated to growing batch sizes; keep the fastest per sequence.

    A sweep stops when the next size would exceed the memory cap (or runs out of CUDA
    memory), when one call takes longer than ``config.floor_call_cap_s``, or, from batch 64
    on, when two sizes in a row gain less than 3% per sequence.
    """
    model = lm.model
    device = config.device
    batch = batch.to(device)
    n_rows, seq = batch.input_ids.shape
    layer = model.get_input_embeddings()
    min_total_s = 0.3 if config.scale == "quick" else 1.0
    table: dict[str, dict[int, float]] = {"forward": {}, "forward_backward": {}}
    stopped: dict[str, str] = {}
    for kind in table:
        grad = kind == "forward_backward"
        best, stale = math.inf, 0
        stopped[kind] = "all sizes measured"
        for bs in FLOOR_BATCH_SIZES:
            need = _activation_bytes(lm, bs * seq, grad, config.torch_dtype)
            if bs > 1 and need > config.floor_memory_cap_bytes:
                stopped[kind] = f"batch {bs}: estimated {need / 2**30:.1f} GiB > memory cap"
                break
            idx = torch.arange(bs, device=device) % n_rows
            with torch.no_grad():
                embeds = layer(batch.input_ids[idx]).detach()
            mask, pos = batch.attention_mask[idx], batch.position_ids[idx]

            def call(
                embeds: Tensor = embeds, mask: Tensor = mask, pos: Tensor = pos, grad: bool = grad
            ) -> None:
                _floor_call(model, embeds, mask, pos, grad)
                synchronize(device)

            try:
                times = _time_calls(call, min_total_s)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                stopped[kind] = f"batch {bs}: out of memory"
                break
            per_seq = min(times) / bs
            table[kind][bs] = per_seq
            if per_seq < best * 0.97:
                best, stale = per_seq, 0
            else:
                best, stale = min(best, per_seq), stale + 1
            if min(times) > config.floor_call_cap_s:
                stopped[kind] = f"batch {bs}: one call took {min(times):.1f} s > time cap"
                break
            if stale >= 2 and bs >= 64:
                stopped[kind] = f"batch {bs}: no gain over the last two sizes"
                break
    fwd, bwd = table["forward"], table["forward_backward"]
    fb, bb = min(fwd, key=fwd.__getitem__), min(bwd, key=bwd.__getitem__)
    return Floor(
        seq_len=seq,
        forward_s=fwd[fb],
        forward_batch=fb,
        backward_s=bwd[bb],
        backward_batch=bb,
        forward_b1_s=fwd[1],
        backward_b1_s=bwd[1],
        table=table,
        stopped=stopped,
    )


def floor_work(
    lm: LanguageModel,
    batch: TokenBatch,
    config: BenchConfig,
    floor: Floor,
    n_forward: int,
    n_backward: int,
) -> Callable[[], float]:
    """A call that runs ``n_forward`` bare forwards and ``n_backward`` forward + backwards of
    the padded prompt batch's sequences as the floor measured them (its best batch sizes) and
    returns the seconds that many sequences took (whole batches, scaled to the count).

    Timed in the rounds of a method (:func:`bench._session.paired_rounds`), it gives the
    method's floor from calls taken seconds apart from the method's own, with as many draws:
    the session's floor, the fastest of dozens of short calls minutes earlier, reads low
    against one round of a long method on a machine whose speed drifts.
    """
    model = lm.model
    device = config.device
    batch = batch.to(device)
    n_rows = batch.input_ids.shape[0]
    layer = model.get_input_embeddings()
    plans = []
    for count, bs, grad in (
        (n_forward, floor.forward_batch, False),
        (n_backward, floor.backward_batch, True),
    ):
        if count <= 0:
            continue
        idx = torch.arange(bs, device=device) % n_rows
        with torch.no_grad():
            embeds = layer(batch.input_ids[idx]).detach()
        calls = max(1, round(count / bs))
        mask, pos = batch.attention_mask[idx], batch.position_ids[idx]
        plans.append((calls, count / (calls * bs), embeds, mask, pos, grad))

    def run() -> float:
        total = 0.0
        for calls, scale, embeds, mask, pos, grad in plans:
            t0 = time.perf_counter()
            for _ in range(calls):
                _floor_call(model, embeds, mask, pos, grad)
            synchronize(device)
            total += (time.perf_counter() - t0) * scale
        return total

    return run


def _floor_call(model: Any, embeds: Tensor, mask: Tensor, pos: Tensor, grad: bool) -> None:
    """One floor call: a bare forward, or a forward + backward w.r.t. ``inputs_embeds``."""
    if grad:
        x = embeds.detach().requires_grad_()
        out = model(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False)
        loss = out.logits[:, -1].float().logsumexp(-1).sum()
        torch.autograd.grad(loss, x)
    else:
        with torch.no_grad():
            model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False)


def _time_calls(call: Callable[[], None], min_total_s: float) -> list[float]:
    """Seconds of repeated calls after one warm-up: at least 3 (2 for calls over a second),
    more until ``min_total_s`` is spent, at most 20."""
    call()
    times: list[float] = []
    while True:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        enough = 2 if times[0] > 1.0 else 3
        if len(times) >= 20 or (len(times) >= enough and sum(times) >= min_total_s):
            return times


def evaluations(method: str, params: dict[str, Any], n: int) -> tuple[int, int]:
    """``(forwards, forward+backwards)`` one prompt with ``n`` feature tokens needs."""
    if method == "occlusion":
        return n + 1, 0
    if method == "kernel_shap":
        return int(params["n_samples"]), 0
    if method == "shapley_sampling":
        return 1 + int(params["n_samples"]) * n, 0
    if method == "exact_shapley":
        return 2**n, 0
    if method == "integrated_gradients":
        return 2, int(params["n_steps"])
    if method in ("saliency", "input_x_gradient", "attnlrp", "cp_lrp"):
        return 0, 1
    if method == "gradient_shap":
        return 0, int(params["n_samples"])
    if method in ("smoothgrad", "vargrad"):
        ig = params.get("base") == "integrated_gradients"
        steps = int(params.get("n_steps", 16)) if ig else 1
        return 0, int(params["n_samples"]) * steps
    if method == "lime":
        return int(params["n_samples"]), 0
    if method in ("attention", "attention_rollout"):
        return 1, 0
    if method == "value_zeroing":
        # One pass, then every layer once per token: about one full forward per token.
        return 1 + n, 0
    raise ValueError(f"no evaluation count for {method!r}")


def floor_seconds(
    method: str, params: dict[str, Any], features: Sequence[int], floor: Floor
) -> float:
    """The compute floor per prompt: mean over prompts of evaluations x per-sequence cost."""
    total = 0.0
    for n in features:
        fwd, bwd = evaluations(method, params, n)
        total += fwd * floor.forward_s + bwd * floor.backward_s
    return total / len(features)


def peer_estimate(
    impl: str, method: str, params: dict[str, Any], n: int, n_answer: int, floor: Floor
) -> float:
    """Rough seconds one prompt costs a peer, from the batch-1 costs (peers run one sequence
    per call) or, for batched steps, the best-batch costs."""
    fwd, bwd = evaluations(method, params, n)
    if method in GRADIENT_METHODS:
        # Captum's LLMGradientAttribution and Inseq: one attribution per answer token.
        per_token = bwd * (floor.backward_s if bwd > 1 else floor.backward_b1_s)
        return n_answer * (per_token + fwd * floor.forward_b1_s)
    if impl == "inseq":  # occlusion per answer token
        return n_answer * fwd * floor.forward_b1_s
    return fwd * floor.forward_b1_s + bwd * floor.backward_b1_s


# ---------------------------------------------------------------------------- memory


def rss_bytes() -> tuple[int | None, int | None]:
    """``(current RSS, peak RSS)`` of this process in bytes (Linux), else ``(None, None)``."""
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


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocated bytes, or on CPU the process's
    peak RSS (reset at entry through ``/proc/self/clear_refs`` where Linux allows it)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak: int | None = None
        self.kind = "cuda_max_memory_allocated" if device == "cuda" else "cpu_peak_rss"
        self._start = 0
        self._reset = False

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self._reset = True
            except OSError:
                self.kind = "cpu_peak_rss_since_process_start"
            self._start = rss_bytes()[0] or 0
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
        else:
            peak = rss_bytes()[1]
            self.peak = None if peak is None else max(0, peak - self._start)


# ---------------------------------------------------------------------------- peers


def captum_runner(
    lm: LanguageModel, method: str, params: dict[str, Any]
) -> Callable[[str, list[int]], Tensor]:
    """``(prompt, answer ids) -> scores [n features]`` through Captum's LLM wrappers, one
    prompt per call; random methods reseed ``torch.manual_seed(SEED)`` before each prompt."""
    from captum.attr import (
        FeatureAblation,
        KernelShap,
        LayerGradientXActivation,
        LayerIntegratedGradients,
        LLMAttribution,
        LLMGradientAttribution,
        ShapleyValueSampling,
        TextTokenInput,
    )

    model, tok = lm.model, lm.tokenizer
    layer = model.get_input_embeddings()

    def text_input(prompt: str) -> Any:
        return TextTokenInput(
            prompt, tok, baselines=tok.pad_token_id, skip_tokens=[tok.bos_token_id]
        )

    if method in ("occlusion", "shapley_sampling", "kernel_shap"):
        algo = {
            "occlusion": FeatureAblation,
            "shapley_sampling": ShapleyValueSampling,
            "kernel_shap": KernelShap,
        }[method](model)
        llm = LLMAttribution(algo, tok)
        kwargs = {"n_samples": params["n_samples"]} if "n_samples" in params else {}

        def perturb(prompt: str, ids: list[int]) -> Tensor:
            if method != "occlusion":
                torch.manual_seed(SEED)
            out = llm.attribute(
                text_input(prompt),
                target=torch.tensor(ids),
                forward_in_tokens=False,
                **kwargs,
            )
            return out.seq_attr.detach().float().cpu()

        return perturb
    if method == "integrated_gradients":
        grad_llm = LLMGradientAttribution(LayerIntegratedGradients(model, layer), tok)

        def integrated(prompt: str, ids: list[int]) -> Tensor:
            inp = text_input(prompt)
            out = grad_llm.attribute(
                inp,
                target=torch.tensor(ids),
                baselines=torch.zeros_like(inp.to_tensor()),  # every feature -> pad id
                n_steps=params["n_steps"],
                method="gausslegendre",
            )
            return out.seq_attr.detach().float().cpu()

        return integrated
    if method == "input_x_gradient":
        ixg_llm = LLMGradientAttribution(LayerGradientXActivation(model, layer), tok)

        def input_x_gradient(prompt: str, ids: list[int]) -> Tensor:
            out = ixg_llm.attribute(text_input(prompt), target=torch.tensor(ids))
            return out.seq_attr.detach().float().cpu()

        return input_x_gradient
    if method in EMBEDDING_PEERS:
        return captum_embedding_runner(lm, method, params)
    raise ValueError(f"Captum has no teacher-forced LLM wrapper for {method!r}")


EMBEDDING_PEERS = frozenset({"gradient_shap", "smoothgrad", "vargrad", "lime"})
"""Methods Captum's LLM wrappers do not take (NoiseTunnel, GradientShap's baseline draw) or
where tokattr's equality is defined on embeddings: timed through Captum's own class on the
prompt's feature embeddings, the target the teacher-forced log-probability of the answer."""


def captum_embedding_runner(
    lm: LanguageModel, method: str, params: dict[str, Any]
) -> Callable[[str, list[int]], Tensor]:
    """``(prompt, answer ids) -> scores [n features]`` from Captum's ``GradientShap``,
    ``NoiseTunnel`` or ``Lime`` on the feature tokens' embeddings (BOS and the answer fixed),
    one prompt per call, NumPy and torch reseeded with ``SEED`` before each prompt (tokattr's
    draws for ``seed=SEED``)."""
    import numpy as np
    from captum.attr import GradientShap, Lime, NoiseTunnel, Saliency

    model, tok = lm.model, lm.tokenizer
    layer = model.get_input_embeddings()
    pad = layer.weight[tok.pad_token_id].detach()

    def setup(prompt: str, ids: list[int]) -> tuple[Tensor, Tensor, Tensor, Callable]:
        prompt_ids = tok(prompt)["input_ids"]
        full = torch.tensor([*prompt_ids, *ids], device=layer.weight.device)
        cols = torch.arange(1, len(prompt_ids), device=full.device)  # BOS left out
        with torch.no_grad():
            x = layer(full)[None]
        n_prompt = len(prompt_ids)

        def f_full(e: Tensor) -> Tensor:
            logits = model(inputs_embeds=e, use_cache=False).logits.float()
            logp = logits[:, n_prompt - 1 : -1].log_softmax(-1)
            return logp.gather(-1, full[n_prompt:].expand(len(e), -1)[..., None]).sum((1, 2))

        return x, cols, pad.expand(len(cols), -1)[None], f_full

    def run(prompt: str, ids: list[int]) -> Tensor:
        x, cols, base, f_full = setup(prompt, ids)

        def f(e: Tensor) -> Tensor:
            full = x.expand(len(e), -1, -1).clone()
            full[:, cols] = e
            return f_full(full)

        np.random.seed(SEED)
        torch.manual_seed(SEED)
        feats = x[:, cols]
        if method == "gradient_shap":
            out = GradientShap(f).attribute(feats, baselines=base, n_samples=params["n_samples"])
            return out[0].sum(-1).detach().float().cpu()
        if method in ("smoothgrad", "vargrad"):
            if params.get("base", "saliency") != "saliency":
                raise ValueError("the Captum peer of the noise tunnel is timed over saliency")
            stdev = 0.15 * float(feats.max() - feats.min())  # tokattr's default rule
            out = NoiseTunnel(Saliency(f)).attribute(
                feats, nt_type=method, nt_samples=params["n_samples"], stdevs=stdev
            )[0]
            reduced = out.norm(dim=-1) if method == "smoothgrad" else out.sum(-1)
            return reduced.detach().float().cpu()
        groups = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
        groups[0, cols] = torch.arange(len(cols), device=x.device)
        baselines = x.clone()
        baselines[0, cols] = pad  # BOS and the answer: baseline = input (never removed)
        with torch.no_grad():
            out = Lime(f_full).attribute(
                x,
                baselines=baselines,
                feature_mask=groups[..., None].expand_as(x),
                n_samples=params["n_samples"],
            )
        return out[0, cols, 0].detach().float().cpu()

    return run


INSEQ_METHOD = {
    "integrated_gradients": "integrated_gradients",
    "occlusion": "occlusion",
    "saliency": "saliency",
    "input_x_gradient": "input_x_gradient",
    "attention": "attention",
    "value_zeroing": "value_zeroing",
}


def inseq_unavailable() -> str | None:
    """Why Inseq cannot run here, or ``None``."""
    if not INSEQ_PYTHON.exists():
        return f"no Inseq environment at {INSEQ_PYTHON} (set TOKATTR_BENCH_INSEQ_PYTHON)"
    return None


def run_inseq(
    model: str,
    method: str,
    params: dict[str, Any],
    prompts: Sequence[tuple[str, str]],
    config: BenchConfig,
    timeout_s: float,
) -> dict[str, Any]:
    """Time Inseq in its own environment (``bench/_inseq_worker.py``); its JSON answer."""
    request = {
        "model_path": str(model_folder(model)),
        "method": INSEQ_METHOD[method],
        "attribute_args": (
            {"n_steps": params["n_steps"], "internal_batch_size": params["n_steps"]}
            if method == "integrated_gradients"
            else {}
        ),
        "prompts": [p for p, _ in prompts],
        "answers": [a for _, a in prompts],
        "device": config.device,
        "dtype": config.dtype,
        "threads": torch.get_num_threads(),
    }
    return _run_worker(str(INSEQ_PYTHON), "_inseq_worker.py", request, timeout_s, "inseq worker")


def run_memory_worker(
    n_steps: int, chunk: int | None, budget: int | None, config: BenchConfig, timeout_s: float
) -> dict[str, Any]:
    """IG on one 1,024-token prompt in a fresh process (``bench/_memory_worker.py``)."""
    lm_tok = build_tokenizer(model_max_length=2048)
    prompt, answer = length_prompts(lm_tok, MEMORY_LENGTH, 1)[0]
    request = {
        "model_path": str(model_folder("llama-100m")),
        "prompt": prompt,
        "answer": answer,
        "n_steps": n_steps,
        "batch_size": chunk,
        "memory_budget": budget,
        "device": config.device,
        "dtype": config.dtype,
        "threads": torch.get_num_threads(),
    }
    return _run_worker(sys.executable, "_memory_worker.py", request, timeout_s, "memory worker")


def _run_worker(
    python: str, script: str, request: dict[str, Any], timeout_s: float, what: str
) -> dict[str, Any]:
    """Run ``bench/<script>`` with ``python``, the request as JSON on stdin; its last JSON
    line."""
    proc = subprocess.run(
        [python, str(BENCH_DIR / script)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=str(REPO),
        env={
            **os.environ,
            **malloc_env(),  # the allocator settings of this process
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
        },
    )
    return _last_json(proc, what)


def _last_json(proc: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout)[-2000:]
    raise RuntimeError(f"{what} exited with {proc.returncode} and no JSON answer:\n{tail}")
