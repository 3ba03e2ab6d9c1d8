"""One benchmark session: models, prompt sets, floors and tokattr's scores, each built once,
and the :class:`~bench._harness.Store` the results go to."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import tokattr
from bench import _harness as h
from bench._report import Store
from tokattr.batching import TokenBatch
from tokattr.models import LanguageModel


class Session:
    """Lazily built, cached state of a benchmark session."""

    def __init__(self, config: h.BenchConfig) -> None:
        self.config = config
        self.store = Store(config)
        self.scores: dict[tuple[str, str, str, str], list[Tensor]] = {}

    # ------------------------------------------------------------------ inputs

    @functools.cache  # noqa: B019 (one Session per pytest session)
    def lm(self, model: str) -> LanguageModel:
        """The model on the session's device and dtype."""
        lm = tokattr.load_model("arith-tiny") if model == "arith-tiny" else h.build_llama_100m()
        lm = h.place(lm, self.config)
        info = {"parameters": h.parameter_count(lm), "vocab_size": len(lm.tokenizer)}
        if model == "llama-100m":
            info["config"] = dict(h.LLAMA_SHAPE)
        print(f"\n[bench] {model}: {info['parameters'] / 1e6:.1f}M parameters", flush=True)
        self.store.models[model] = info
        return lm

    @functools.cache  # noqa: B019
    def prompts(self, model: str, prompt_set: str) -> list[tuple[str, str]]:
        """``(prompt, answer)`` pairs of a prompt set."""
        if prompt_set == h.ARITH_SET:
            return h.arith_prompts()
        n = h.set_length(prompt_set)
        return h.length_prompts(self.lm(model).tokenizer, n, self.config.llama_prompts(n))

    @functools.cache  # noqa: B019
    def batch(self, model: str, prompt_set: str) -> TokenBatch:
        """The padded batch tokattr builds for the prompt set."""
        return h.token_batch(self.lm(model), self.prompts(model, prompt_set))

    def features(self, model: str, prompt_set: str) -> list[int]:
        """Feature tokens per prompt."""
        return [len(t) for t in self.batch(model, prompt_set).token_ids]

    def answer_lengths(self, model: str, prompt_set: str) -> list[int]:
        """Answer tokens per prompt."""
        return [len(t) for t in self.batch(model, prompt_set).answer_tokens]

    @functools.cache  # noqa: B019
    def floor(self, model: str, prompt_set: str) -> h.Floor:
        """The per-sequence costs on the prompt set's padded batch, measured once."""
        floor = self._measure_floor(model, prompt_set)
        print(
            f"\n[bench] floor {model}/{prompt_set}: forward {floor.forward_s * 1e3:.3f} ms/seq "
            f"(batch {floor.forward_batch}), forward+backward {floor.backward_s * 1e3:.3f} ms/seq "
            f"(batch {floor.backward_batch})",
            flush=True,
        )
        return floor

    def floor_now(self, model: str, prompt_set: str) -> h.Floor:
        """The floor measured just now where that is cheap (under 10 s, e.g. the bundled
        model), so a method's time and its floor are taken minutes apart at most on a machine
        whose speed drifts; else the session's one measurement (whose per-sequence costs a
        case then times again in its own rounds, :func:`bench._harness.floor_work`)."""
        floor = self.floor(model, prompt_set)
        if self.floor_is_old(model, prompt_set):
            return floor
        return self._measure_floor(model, prompt_set)

    def floor_is_old(self, model: str, prompt_set: str) -> bool:
        """Whether :meth:`floor_now` gives the session's one measurement (too dear to repeat)."""
        self.floor(model, prompt_set)
        return self.store.floors[f"{model}/{prompt_set}"]["measured_in_s"] >= 10.0

    def _measure_floor(self, model: str, prompt_set: str) -> h.Floor:
        """Measure the floor and record it (with how long measuring took) in the results."""
        t0 = time.perf_counter()
        floor = h.measure_floor(self.lm(model), self.batch(model, prompt_set), self.config)
        record = floor.to_dict()
        record["measured_in_s"] = time.perf_counter() - t0
        record["session"] = self.store.started
        self.store.floors[f"{model}/{prompt_set}"] = record
        return floor

    # ------------------------------------------------------------------ running

    def tokattr_kwargs(self, method: str, impl: str, params: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of ``tokattr.attribute`` for a tokattr implementation."""
        kwargs = dict(params)
        if impl == "tokattr-full_sequences":  # prefix reuse is on by default
            kwargs["prefix_reuse"] = False
        return kwargs

    def run_tokattr(
        self,
        model: str,
        prompt_set: str,
        method: str,
        impl: str,
        params: dict[str, Any],
        subset: list[tuple[str, str]] | None = None,
    ) -> list[Tensor]:
        """tokattr's scores on the whole prompt set (one call, as timed), or on ``subset`` of
        it (then not kept)."""
        prompts = self.prompts(model, prompt_set) if subset is None else subset
        out = tokattr.attribute(
            self.lm(model),
            [p for p, _ in prompts],
            method=method,
            target=[a for _, a in prompts],
            baseline="pad",
            seed=h.SEED,
            batch_size=self.config.batch_size,
            **self.tokattr_kwargs(method, impl, params),
        )
        assert isinstance(out, list)
        scores = [a.scores.detach().float().cpu() for a in out]
        if subset is None:
            self.scores[(model, prompt_set, method, impl)] = scores
        return scores

    def tokattr_scores(
        self, model: str, prompt_set: str, method: str, impl: str, params: dict[str, Any]
    ) -> list[Tensor]:
        """tokattr's scores, computed (untimed) if the tokattr case did not run."""
        key = (model, prompt_set, method, impl)
        if key not in self.scores:
            self.run_tokattr(model, prompt_set, method, impl, params)
        return self.scores[key]


def timed_rounds(
    benchmark: Any, fn: Callable[[], Any], rounds: int, warmup: int, device: str
) -> tuple[list[float], int | None, str]:
    """Run ``fn`` through ``benchmark.pedantic``; ``(seconds of each timed round, peak memory
    bytes over the rounds, memory kind)``. Warm-up rounds are not in the list."""
    times, peak, kind, _ = _rounds(benchmark, fn, None, rounds, warmup, device)
    return times, peak, kind


def paired_rounds(
    benchmark: Any,
    fn: Callable[[], Any],
    partner: Callable[[], Any],
    rounds: int,
    device: str,
    warmup: int = 0,
) -> tuple[list[float], int | None, str, list[float]]:
    """``rounds`` rounds of ``fn`` then ``partner``, both timed, through ``benchmark.pedantic``
    (which sees the pair); ``(seconds of each fn, peak memory bytes of fn, memory kind,
    seconds of each partner)``. A partner that returns a float gives its own seconds (a part
    of what it ran, :func:`bench._harness.floor_work`)."""
    return _rounds(benchmark, fn, partner, rounds, warmup, device)


def _rounds(
    benchmark: Any,
    fn: Callable[[], Any],
    partner: Callable[[], Any] | None,
    rounds: int,
    warmup: int,
    device: str,
) -> tuple[list[float], int | None, str, list[float]]:
    times: list[float] = []
    partner_times: list[float] = []
    peaks: list[int] = []
    kind = ""

    def call() -> Any:
        nonlocal kind
        with h.PeakMemory(device) as pm:
            t0 = time.perf_counter()
            out = fn()
            h.synchronize(device)
            times.append(time.perf_counter() - t0)
        kind = pm.kind
        if pm.peak is not None:
            peaks.append(pm.peak)
        if partner is not None:
            t0 = time.perf_counter()
            own = partner()
            h.synchronize(device)
            seconds = time.perf_counter() - t0
            partner_times.append(own if isinstance(own, float) else seconds)
        return out

    benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup, iterations=1)
    timed = times[warmup:] or times
    peak = max(peaks[warmup:] or peaks) if peaks else None
    return timed, peak, kind, partner_times[warmup:] or partner_times


def rounds_for(estimate_s: float) -> tuple[int, int]:
    """``(rounds, warm-up rounds)`` for a call estimated to take ``estimate_s`` seconds."""
    if estimate_s < 0.1:  # the floor keeps the best of ~0.3 s of calls: match that
        return 20, 2
    if estimate_s < 0.5:  # the fastest of a second or more of calls
        return 10, 1
    if estimate_s < 5:
        return 3, 1
    if estimate_s < 60:
        return 1, 1
    return 1, 0


def summarise(times: list[float], n_prompts: int) -> dict[str, float]:
    """Seconds per prompt: the fastest round's and the median round's."""
    return {
        "seconds_per_prompt": min(times) / n_prompts,
        "seconds_per_prompt_median": statistics.median(times) / n_prompts,
    }


def equality(
    ours: list[Tensor], theirs: list[Tensor], tolerance: float
) -> dict[str, float | bool | int]:
    """Max abs and relative (to the largest peer score) difference over prompts."""
    max_abs, scale = 0.0, 0.0
    for a, b in zip(ours, theirs, strict=False):
        if a.shape != b.shape:
            return {
                "max_abs_diff": float("inf"),
                "max_rel_diff": float("inf"),
                "passed": False,
                "n_prompts": len(theirs),
                "tolerance": tolerance,
            }
        max_abs = max(max_abs, float((a - b).abs().max()))
        scale = max(scale, float(b.abs().max()))
    rel = max_abs / max(scale, 1e-12)
    return {
        "max_abs_diff": max_abs,
        "max_rel_diff": rel,
        "tolerance": tolerance,
        "passed": bool(rel <= tolerance and torch.isfinite(torch.tensor(rel))),
        "n_prompts": len(theirs),
    }
