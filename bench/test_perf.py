"""The timed cases: every (model, prompt set, method, implementation), then the memory case.

Case ids read ``<model>-<prompt set>-<method>-<implementation>``, e.g.
``arith-tiny-arith32-occlusion-captum``, so ``-k "arith and occlusion"`` picks a subset.
Speed is recorded, never asserted; the Captum equality checks are recorded and asserted.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bench import _harness as h
from bench._session import (
    Session,
    equality,
    paired_rounds,
    rounds_for,
    summarise,
    timed_rounds,
)

PAIRED_FLOOR_MAX_S = 300.0
"""A tokattr case whose floor is estimated at most this many seconds times its floor in its
own rounds (:func:`bench._harness.floor_work`) where the session's floor was measured once."""

CASES = [
    (model, pset, method, impl)
    for model in h.MODELS
    for pset in h.prompt_sets(model)
    for method in h.model_methods(model)
    for impl in h.implementations(method)
]


def _row(session: Session, model: str, pset: str, method: str, impl: str) -> dict[str, Any]:
    return {
        "model": model,
        "prompt_set": pset,
        "method": method,
        "implementation": impl,
        "device": session.config.device,
        "dtype": session.config.dtype,
        "scale": session.config.scale,
    }


def _skip(session: Session, row: dict[str, Any], reason: str) -> None:
    row.update(status="skipped", reason=reason)
    session.store.add_row(row)
    pytest.skip(reason)


def _measure(
    session: Session,
    row: dict[str, Any],
    method: str,
    params: dict[str, Any],
    prompts: list[tuple[str, str]],
    features: list[int],
    floor: h.Floor,
    times: list[float],
    peak: int | None,
    memory_kind: str,
) -> None:
    n = len(prompts)
    fwd_bwd = [h.evaluations(method, params, k) for k in features[:n]]
    floor_s = h.floor_seconds(method, params, features[:n], floor)
    row.update(summarise(times, n))
    lengths = [len(session.lm(row["model"]).tokenizer(p)["input_ids"]) for p, _ in prompts]
    row.update(
        status="ok",
        params=params,
        n_prompts=n,
        rounds=len(times),
        prompt_tokens_mean=sum(lengths) / n,
        features_mean=sum(features[:n]) / n,
        padded_seq_len=floor.seq_len,
        evaluations_per_prompt={
            "forward": sum(f for f, _ in fwd_bwd) / n,
            "forward_backward": sum(b for _, b in fwd_bwd) / n,
        },
        floor_seconds_per_prompt=floor_s,
        ratio_to_floor=row["seconds_per_prompt"] / floor_s if floor_s > 0 else None,
        peak_memory_bytes=peak,
        memory_kind=memory_kind,
    )


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_perf(benchmark: Any, session: Session, case: tuple[str, str, str, str]) -> None:
    """Time one implementation of one method on one prompt set; record the row."""
    model, pset, method, impl = case
    cfg = session.config
    row = _row(session, model, pset, method, impl)
    benchmark.group = f"{model}/{pset}/{method}"
    params = cfg.method_params(model, pset, method)
    if params is None:
        _skip(session, row, f"not run at scale {cfg.scale}")
    assert params is not None
    if impl in ("captum", "inseq") and impl not in cfg.peers:
        _skip(session, row, f"peer {impl} disabled (--bench-peers)")
    if impl == "tokattr-full_sequences" and not h.prefix_reuse_supported(method):
        _skip(session, row, f"tokattr's {method} has no prefix_reuse parameter")
    if impl == "inseq" and (why := h.inseq_unavailable()):
        _skip(session, row, why)

    prompts = session.prompts(model, pset)
    features = session.features(model, pset)
    floor = session.floor_now(model, pset)

    if impl.startswith("tokattr"):
        estimate = h.floor_seconds(method, params, features, floor) * len(prompts)
        rounds, warmup = rounds_for(estimate)

        def run() -> Any:
            return session.run_tokattr(model, pset, method, impl, params)

        row["timing"] = "pytest-benchmark rounds of one tokattr.attribute call on all prompts"
        paired: list[float] | None = None
        if session.floor_is_old(model, pset) and estimate <= PAIRED_FLOOR_MAX_S:
            # The session's floor is minutes old and the fastest of many short calls: time
            # the method's floor again after each of its rounds, with as many draws.
            evals = [h.evaluations(method, params, k) for k in features[: len(prompts)]]
            work = h.floor_work(
                session.lm(model),
                session.batch(model, pset),
                cfg,
                floor,
                sum(f for f, _ in evals),
                sum(b for _, b in evals),
            )
            times, peak, kind, paired = paired_rounds(
                benchmark, run, work, max(rounds, 2), cfg.device, warmup
            )
        else:
            times, peak, kind = timed_rounds(benchmark, run, rounds, warmup, cfg.device)
        _measure(session, row, method, params, prompts, features, floor, times, peak, kind)
        if paired is not None:
            paired_floor = min(paired) / len(prompts)
            row.update(
                session_floor_seconds_per_prompt=row["floor_seconds_per_prompt"],
                session_ratio_to_floor=row["ratio_to_floor"],
                floor_seconds_per_prompt=paired_floor,
                ratio_to_floor=row["seconds_per_prompt"] / paired_floor,
                floor_timing=(
                    "paired: after each round, the method's evaluations as bare padded "
                    "sequences at the floor's best batch sizes; the fastest of those over the "
                    "fastest round"
                ),
            )
        session.store.add_row(row)
        return

    # A peer: as many prompts as fit the budget, one prompt per call.
    answers = session.answer_lengths(model, pset)
    estimates = [
        h.peer_estimate(impl, method, params, n, a, floor)
        for n, a in zip(features, answers, strict=True)
    ]
    k, total = 0, 0.0
    while k < len(prompts) and total + estimates[k] <= cfg.peer_budget_s:
        total += estimates[k]
        k += 1
    if k == 0:
        _skip(
            session,
            row,
            f"estimated {estimates[0]:.0f} s for one prompt > peer budget "
            f"{cfg.peer_budget_s:.0f} s (--bench-peer-budget)",
        )
    subset = prompts[:k]
    if k < len(prompts):
        row["note"] = (
            f"ran on the first {k} of {len(prompts)} prompts (estimated {sum(estimates):.0f} s "
            f"for all > peer budget {cfg.peer_budget_s:.0f} s)"
        )

    if impl == "inseq":
        timeout = 3 * total + 600
        answer: dict[str, Any] = {}

        def run() -> None:
            answer.update(h.run_inseq(model, method, params, subset, cfg, timeout))

        benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
        if answer.get("status") != "ok":
            row.update(status="error", reason=answer.get("reason"))
            session.store.add_row(row)
            pytest.skip(f"inseq failed: {answer.get('reason')}")
        row["timing"] = (
            "inseq worker: each prompt once after one warm-up prompt (model load excluded)"
        )
        row["inseq_version"] = answer.get("inseq_version")
        _measure(
            session,
            row,
            method,
            params,
            subset,
            features,
            floor,
            [sum(answer["seconds"])],
            answer.get("peak_bytes"),
            "inseq worker: cuda_max_memory_allocated or peak RSS above the warmed-up RSS",
        )
        session.store.add_row(row)
        return

    lm = session.lm(model)
    runner = h.captum_runner(lm, method, params)
    ids = [h.answer_ids(lm, p, a) for p, a in subset]
    if estimates[0] < 0.1 * cfg.peer_budget_s:
        runner(subset[0][0], ids[0])  # warm-up
    scores: list[torch.Tensor] = []

    def run_captum() -> None:
        scores.clear()
        for (p, _), t in zip(subset, ids, strict=True):
            scores.append(runner(p, t))

    # Best of 3 passes where a pass is cheap (as tokattr's time is a best of rounds too), each
    # followed by one tokattr call on the same prompts: the speed-up over Captum compares
    # rounds taken seconds apart, on a machine whose speed drifts over minutes.
    if total <= 20.0:
        times, peak, kind, paired = paired_rounds(
            benchmark,
            run_captum,
            lambda: session.run_tokattr(model, pset, method, "tokattr", params, subset),
            3,
            cfg.device,
        )
        row["paired_tokattr_seconds_per_prompt"] = min(paired) / len(subset)
        row["timing"] = (
            "best of 3 passes over the prompts, one Captum call per prompt; each pass followed "
            "by one tokattr.attribute call on the same prompts (paired_tokattr_seconds_per_prompt)"
        )
    else:
        times, peak, kind = timed_rounds(benchmark, run_captum, 1, 0, cfg.device)
        row["timing"] = "one pass over the prompts, one Captum call per prompt"
    _measure(session, row, method, params, subset, features, floor, times, peak, kind)
    session.store.add_row(row)

    # Equality with tokattr, where both compute the same quantity.
    tolerance = h.BF16_TOLERANCE if cfg.dtype == "bf16" else h.EQUALITY_TOLERANCE[method]
    failed = []
    for own in ("tokattr", "tokattr-full_sequences"):
        key = (model, pset, method, own)
        if own == "tokattr":
            ours = session.tokattr_scores(model, pset, method, own, params)
        elif key in session.scores:
            ours = session.scores[key]
        else:
            continue
        check = {**_row(session, model, pset, method, own), "peer": "captum"}
        check.update(equality(ours[:k], scores, tolerance))
        if method == "kernel_shap" and params["n_samples"] <= max(features[:k]) + 1:
            # Fewer coalitions than unknowns: the fit is under-determined and its minimum-norm
            # solution depends on the solver's rank cut-off (Captum hands scikit-learn
            # float32, tokattr solves in float64), so the two need not agree.
            check.update(
                passed=None,
                note=f"not compared: {params['n_samples']} coalitions for "
                f"{max(features[:k])} tokens + intercept (under-determined)",
            )
        session.store.add_equality(check)
        if check["passed"] is False:
            failed.append(check)
    assert not failed, f"tokattr's scores differ from Captum's: {failed}"


MEMORY_RUNS = ("small_chunk", "large_chunk", "memory_budget")


@pytest.mark.parametrize(
    "run", MEMORY_RUNS, ids=[f"llama-100m-len1024-integrated_gradients-{r}" for r in MEMORY_RUNS]
)
def test_memory(benchmark: Any, session: Session, run: str) -> None:
    """Peak memory of IG on one 1,024-token prompt (fresh process per run)."""
    cfg = session.config
    n_steps, (small, large) = cfg.memory_case()
    budget = cfg.memory_budget_bytes
    record: dict[str, Any] = {
        "name": run,
        "n_steps": n_steps,
        "memory_budget_bytes": budget,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "prompt_tokens": h.MEMORY_LENGTH,
    }
    chunk = None if run == "memory_budget" else small if run == "small_chunk" else large
    answer: dict[str, Any] = {}

    def go() -> None:
        answer.update(
            h.run_memory_worker(n_steps, chunk, budget if chunk is None else None, cfg, 7200)
        )

    benchmark.group = "llama-100m/len1024/integrated_gradients memory"
    benchmark.pedantic(go, rounds=1, warmup_rounds=0, iterations=1)
    record.update(answer)
    record["batch_size"] = chunk if chunk is not None else "auto (memory_budget)"
    session.store.add_memory(run, record)
    if answer.get("status") != "ok":
        pytest.skip(f"memory worker failed: {answer.get('reason')}")
