"""Checks of what a user asks for, in one place, before any model work.

``tokattr.attribute``, ``tokattr.evaluate``, the benchmark's ``AttributionModule`` and
``tokattr bench`` all take method names and hyper-parameters, metric names and parameters, a
baseline, a target function, batch sizes and prompts. Each is checked here, so the four entry
points refuse the same inputs with the same short messages.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Mapping, Sequence

from tokattr.batching import Answer, Features, check_prompt, is_token_ids
from tokattr.features import feature_spans, is_spans
from tokattr.messages import quote
from tokattr.methods import METHODS
from tokattr.methods.problem import Method
from tokattr.metrics import METRICS, applies
from tokattr.targets import TARGETS, TargetFunction

BASELINES = ("pad", "unk", "zero")
"""How a removed token is replaced: the pad token's embedding (default), the unk token's, or
the zero vector. Its position id is kept."""


def method_parameters(method: str) -> dict[str, inspect.Parameter]:
    """The hyper-parameters a method takes, by name.

    Raises:
        ValueError: an unknown method (the message lists the known ones).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    return _init_parameters(METHODS[method])


def build_method(method: str, params: Mapping[str, object]) -> Method:
    """An instance of ``METHODS[method]`` with ``params``, refusing unknown parameters (and
    whatever the method's own ``__init__`` refuses)."""
    valid = method_parameters(method)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for method {method!r}; it takes "
            f"{sorted(valid) or 'no parameters'}"
        )
    return METHODS[method](**dict(params))


def known_methods(names: Sequence[str]) -> list[str]:
    """``names`` as a list, every one a method of :data:`tokattr.methods.METHODS`.

    Raises:
        ValueError: unknown method(s), all named, with the known ones.
    """
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    return list(names)


def method_specs(
    methods: str | Sequence[str] | Mapping[str, Mapping[str, object] | None],
) -> dict[str, dict[str, object]]:
    """``{method: hyper-parameters}`` from names or a mapping, every method built once to
    refuse unknown names and bad parameters now."""
    if isinstance(methods, str):
        methods = [methods]
    specs = (
        {m: dict(p or {}) for m, p in methods.items()}
        if isinstance(methods, Mapping)
        else {m: {} for m in methods}
    )
    if not specs:
        raise ValueError("no methods given")
    known_methods(list(specs))
    for name, params in specs.items():
        build_method(name, params)
    return specs


def metric_names(
    metrics: str | Sequence[str] | None,
    params: Mapping[str, Mapping[str, object]] | None = None,
    methods: Sequence[str] | None = None,
) -> list[str]:
    """The metrics to compute (``None``: all of them), each name and parameter checked, and
    (given ``methods``) at least one metric that applies to one of them.

    Raises:
        ValueError: no metrics, an unknown metric or parameter, parameters for a metric not
            computed, or no metric that applies to the methods (an empty table).
    """
    if metrics is None:
        names = list(METRICS)
    else:
        names = [metrics] if isinstance(metrics, str) else list(metrics)
    if not names:
        raise ValueError("no metrics given")
    unknown = sorted(set(names) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    extra = sorted(set(params or {}) - set(names))
    if extra:
        raise ValueError(f"parameters given for metric(s) {extra} that are not computed")
    for name in names:
        given = dict((params or {}).get(name) or {})
        takes = list(_init_parameters(METRICS[name]))
        bad = sorted(set(given) - set(takes))
        if bad:
            raise ValueError(
                f"unknown parameter(s) {bad} for metric {name!r}; it takes "
                f"{takes or 'no parameters'}"
            )
        METRICS[name](**given)  # the metric's own range checks
    if methods is not None and not any(applies(n, m, methods) for n in names for m in methods):
        raise ValueError(
            f"none of the metrics {names} applies to the methods {sorted(methods)} (e.g. "
            "completeness_error is for integrated_gradients, and random as its control): the "
            "table would be empty"
        )
    return names


def check_baseline(baseline: str) -> str:
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose from {BASELINES}")
    return baseline


def check_bench_target(target_fn: str) -> None:
    """The benchmark runner scores each example's own answer: a target function it can run
    (a name of :data:`~tokattr.targets.TARGETS` other than ``contrast``, which needs foils)."""
    target_function(target_fn)
    if target_fn == "contrast":
        raise ValueError("target_fn='contrast' needs foils, which the runner does not take")


def target_function(target_fn: str | TargetFunction) -> tuple[TargetFunction, str]:
    """The target function and its name (a callable's ``__name__``, else ``"custom"``)."""
    if callable(target_fn):
        return target_fn, getattr(target_fn, "__name__", "custom")
    if target_fn not in TARGETS:
        raise ValueError(f"unknown target_fn {target_fn!r}; choose from {sorted(TARGETS)}")
    return TARGETS[target_fn], target_fn


def check_positive_int(value: object, name: str, optional: bool = False) -> None:
    """``value`` is an int >= 1 (or ``None`` when ``optional``)."""
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def prompt_list(prompts: object) -> list[str]:
    """One prompt or a list of them as a list, each a non-empty string.

    Raises:
        TypeError: a mapping (a tokenizer's ``BatchEncoding``) or a prompt that is not text.
        ValueError: no prompts, or an empty prompt.
    """
    if isinstance(prompts, Mapping):
        raise TypeError(
            f"prompts must be a string or a list of strings, got {type(prompts).__name__} "
            "(a tokenizer's output?): pass the text"
        )
    out = [prompts] if isinstance(prompts, str) else list(prompts)  # type: ignore[call-overload]
    if not out:
        raise ValueError("no prompts given")
    for p in out:
        check_prompt(p)
    return out


def per_prompt(
    value: Answer | Sequence[Answer | None] | None, n_prompts: int, what: str
) -> list[Answer | None]:
    """One answer (or foil) per prompt: a string or token ids for a single prompt, or a list
    with one per prompt (``None`` entries for targets: the greedy answer)."""
    if value is None:
        return [None] * n_prompts
    if isinstance(value, str) or is_token_ids(value):
        if n_prompts != 1:
            raise ValueError(f"give one {what} per prompt (a list of {n_prompts}), not one {what}")
        return [value]  # type: ignore[list-item]
    values = list(value)  # type: ignore[arg-type]
    if len(values) != n_prompts:
        raise ValueError(f"{len(values)} {what}s for {n_prompts} prompts")
    if what == "foil" and any(v is None for v in values):
        raise ValueError("give a foil for every prompt")
    return values


def per_prompt_features(
    features: Features | Sequence[Features], prompts: Sequence[str], single: bool
) -> list[Features]:
    """One feature specification per prompt, each checked against its prompt now (before any
    model call): a granularity name or explicit spans for every prompt, or a list with one per
    prompt. A single prompt's explicit spans are a list of pairs.

    Raises:
        ValueError: a granularity that does not exist, spans out of range, overlapping, out of
            order or empty, a prompt with no feature, or a list of the wrong length.
    """
    if (
        isinstance(features, str)
        or (single and is_spans(features))
        or (isinstance(features, Sequence) and not features and single)
    ):
        specs = [features] * len(prompts)
    elif isinstance(features, Sequence) and not is_spans(features):
        specs = list(features)
        if len(specs) != len(prompts):
            raise ValueError(
                f"{len(specs)} feature specifications for {len(prompts)} prompts: give one "
                "granularity for all, or one per prompt"
            )
    else:
        raise ValueError(
            "features must be a granularity name (token, word, sentence, line, "
            "separator:<s>), a prompt's (start, end) spans, or one of those per prompt; got "
            f"{quote(features, 40)}"
        )
    for i, (prompt, spec) in enumerate(zip(prompts, specs, strict=True)):
        try:
            feature_spans(prompt, spec)  # type: ignore[arg-type]
        except ValueError as err:
            where = "" if single else f"prompt {i} {quote(prompt, 40)}: "
            raise ValueError(f"{where}{err}") from None
    return specs  # type: ignore[return-value]


def per_prompt_seed(seed: int | Sequence[int | None] | None, n: int) -> list[int | None]:
    """One seed per prompt: an int (or ``None``) for all, or a list with one each."""
    if seed is None or isinstance(seed, numbers.Integral):
        return [None if seed is None else int(seed)] * n
    seeds = [None if s is None else int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    return seeds


def _init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    params = inspect.signature(cls.__init__).parameters
    return {
        k: p
        for k, p in params.items()
        if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
