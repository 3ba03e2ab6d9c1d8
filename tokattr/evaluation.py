"""``evaluate``: methods x faithfulness metrics over a set of prompts, in plain Python.

For each method and each batch of prompts, :func:`score_batch` attributes (as
:func:`tokattr.attribute` does), then hands every metric that applies the same
:class:`~tokattr.metrics.inputs.MetricInputs` (:mod:`tokattr.metrics`). The result is a
method x metric table (:mod:`tokattr.table`): the mean over examples and a
percentile-bootstrap interval, each metric's direction stated.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tokattr.answers import fill_greedy_answers, texts_of
from tokattr.attribution import Attribution, attribute_collated
from tokattr.batching import Answer, Encoded, Features, collate, encode_examples
from tokattr.chat import DEFAULT_ROLES, chat_prompts
from tokattr.data.labels import relevance
from tokattr.engine.memory import states_budget
from tokattr.methods.problem import Method
from tokattr.metrics import METRICS, ExactShapleyCache, MetricInputs, applies
from tokattr.models import LanguageModel, reinitialised
from tokattr.problems import DEFAULT_BATCH_SIZE, batch_problem, pass_sizes
from tokattr.table import EvaluationTable, table_from_values
from tokattr.validation import (
    build_method,
    check_baseline,
    check_positive_int,
    method_specs,
    metric_names,
    per_prompt,
    per_prompt_features,
    prompt_list,
    target_function,
)

DEFAULT_METHODS = ("integrated_gradients", "saliency", "input_x_gradient", "occlusion", "random")


def needs_random_model(metrics: Sequence[str]) -> bool:
    """Whether any of ``metrics`` compares against the re-initialised model."""
    return any("random_scores" in METRICS[n].needs for n in metrics)


def evaluate(
    lm: LanguageModel,
    prompts: Sequence[str],
    answers: Sequence[Answer | None] | None = None,
    methods: Sequence[str] | Mapping[str, Mapping[str, object] | None] = DEFAULT_METHODS,
    metrics: Sequence[str] | None = None,
    *,
    baseline: str = "pad",
    target_fn: str = "log_prob",
    batch_size: int = DEFAULT_BATCH_SIZE,
    seeds: Sequence[int] | None = None,
    metric_params: Mapping[str, Mapping[str, object]] | None = None,
    random_model: LanguageModel | None = None,
    randomization_seed: int = 0,
    shapley_max_tokens: int = 16,
    n_bootstrap: int = 1000,
    progress: bool = True,
    features: Features | Sequence[Features] = "token",
    sources: Sequence[Sequence[int] | None] | None = None,
    feature_roles: Sequence[str] = DEFAULT_ROLES,
) -> EvaluationTable:
    """Score every method with every metric on the same prompts and answers.

    Args:
        lm: the model (:func:`tokattr.load_model`).
        prompts: the prompts: text, or chats (lists of ``{"role", "content"}`` messages,
            :func:`tokattr.attribute`).
        answers: the answer attributed for each prompt (a string or token ids); ``None`` (for
            all, or for one prompt in the list): the model's greedy answer, as generated ids.
        methods: method names, or ``{name: {hyper-parameter: value}}``.
        metrics: names in :data:`tokattr.metrics.METRICS`; ``None``: all of them.
            ``completeness_error`` is reported for integrated_gradients and
            ``shapley_error`` for kernel_shap and shapley_sampling (on prompts of at most
            ``shapley_max_tokens`` tokens), each also for ``random`` when one of those
            methods is in the run, as the control they are checked against.
        baseline: how a token is removed, for the methods and the metrics alike.
        target_fn: the target function (see :func:`tokattr.attribute`).
        batch_size: prompts per batch, and the most sequences in one forward pass.
        seeds: one seed per prompt for random methods and random perturbations (default: the
            prompt's index), so a prompt's numbers do not depend on its batch.
        metric_params: ``{metric: {parameter: value}}``, e.g.
            ``{"infidelity": {"n_perturb_samples": 32}}``.
        random_model: the re-initialised model of ``randomization_spearman`` (default:
            :func:`tokattr.models.reinitialised` with ``randomization_seed``).
        n_bootstrap: bootstrap resamples for the 95% intervals.
        progress: show a progress bar.
        features: what gets a score, for every method and every metric (a metric removes a
            whole feature): ``"token"`` (default), ``"word"``, ``"sentence"``, ``"line"``,
            ``"separator:<s>"`` or explicit spans, one for all prompts or one per prompt (see
            :func:`tokattr.attribute`).
        sources: per prompt, the indices of the features the answer depends on (e.g.
            :class:`tokattr.data.LookupGenerator`'s ``sources`` with its ``segments`` as
            ``features``): the ground truth of ``plausibility_auprc``,
            ``plausibility_precision`` and ``plausibility_top1`` (the other features are the
            negatives).
        feature_roles: the roles of a chat prompt whose contents are features.

    Raises:
        ValueError: unknown method, method parameter, metric, metric parameter or baseline;
            no prompts; a prompt the model cannot take (see :func:`tokattr.attribute`). Every
            input is checked before the first method runs.
    """
    specs = method_specs(methods)
    names = metric_names(metrics, metric_params, list(specs))
    check_baseline(baseline)
    target_function(target_fn)
    check_positive_int(batch_size, "batch_size")
    _, prompts, features = chat_prompts(lm.tokenizer, prompts, features, feature_roles)
    prompts_ = prompt_list(prompts)
    seed_list = list(range(len(prompts_))) if seeds is None else [int(s) for s in seeds]
    if len(seed_list) != len(prompts_):
        raise ValueError(f"{len(seed_list)} seeds for {len(prompts_)} prompts")
    answer_list = per_prompt(answers, len(prompts_), "answer")
    feature_specs = per_prompt_features(features, prompts_, single=False)
    source_list = check_sources(sources, len(prompts_))
    # Lengths in tokens before any generation; the greedy answers as generated token ids.
    answer_list = fill_greedy_answers(lm, prompts_, answer_list)
    # Tokenize everything first: a bad prompt fails before any method has run.
    encoded = encode_examples(
        lm.tokenizer, prompts_, answer_list, None, lm.max_length, feature_specs
    )
    for i, (e, src) in enumerate(zip(encoded, source_list, strict=True)):
        n = len(e.spans) if e.spans is not None else sum(not s for s in e.special)
        if src is not None and any(not 0 <= j < n for j in src):
            raise ValueError(f"prompt {i}: sources {list(src)} must index its {n} features")
    if needs_random_model(names) and random_model is None:
        random_model = reinitialised(lm, randomization_seed)

    chunks = [
        range(i, min(i + batch_size, len(encoded))) for i in range(0, len(encoded), batch_size)
    ]
    values: dict[tuple[str, str], list[Tensor]] = {}
    attributions: dict[str, list[Attribution]] = {m: [] for m in specs}
    exact = ExactShapleyCache(shapley_max_tokens)
    bar = _progress(len(specs) * len(prompts_), progress)
    for method, params in specs.items():
        runner = build_method(method, params)
        bar.set_description(method)
        for chunk in chunks:
            scored = score_batch(
                lm,
                [encoded[i] for i in chunk],
                [prompts_[i] for i in chunk],
                [a if isinstance(a := answer_list[i], str) else None for i in chunk],
                [seed_list[i] for i in chunk],
                method,
                params,
                [n for n in names if applies(n, method, specs)],
                metric_params,
                runner=runner,
                baseline=baseline,
                target_fn=target_fn,
                batch_size=batch_size,
                random_model=random_model,
                exact=exact,
                sources=[source_list[i] for i in chunk],
            )
            attributions[method] += scored.attributions
            for name, v in scored.values.items():
                values.setdefault((method, name), []).append(v)
            bar.update(len(chunk))
    bar.close()
    return table_from_values(
        {k: torch.cat(v) for k, v in values.items()}, metric_params, n_bootstrap, attributions
    )


@dataclass(frozen=True)
class BatchScores:
    """One method on one batch: the attributions, and each applicable metric's per-example
    values (``[batch]``, or ``[batch, K]`` per token fraction). With ``keep_errors``,
    ``errors`` names the examples whose target or scores were not finite: their metric values
    are NaN and their curves ``None``."""

    attributions: list[Attribution]
    values: dict[str, Tensor]
    curves: list[dict[str, list[float]] | None] | None = None  # per example: f along the curves
    errors: dict[int, str] = field(default_factory=dict)  # example index -> why it has no scores


def example_key(e: Encoded) -> Hashable:
    """What identifies an example's inputs for the exact-Shapley cache."""
    return (tuple(e.prompt_ids), tuple(e.answer_ids), e.feature_key())


def score_batch(
    lm: LanguageModel,
    encoded: Sequence[Encoded],
    prompts: Sequence[str],
    answers: Sequence[str | None] | None,
    seeds: Sequence[int],
    method: str,
    params: Mapping[str, object],
    metrics: Sequence[str],
    metric_params: Mapping[str, Mapping[str, object]] | None = None,
    *,
    runner: Method | None = None,
    baseline: str = "pad",
    target_fn: str = "log_prob",
    batch_size: int = DEFAULT_BATCH_SIZE,
    random_model: LanguageModel | None = None,
    exact: ExactShapleyCache | None = None,
    roles: Sequence[Sequence[str] | None] | None = None,
    keep_errors: bool = False,
    sources: Sequence[Sequence[int] | None] | None = None,
) -> BatchScores:
    """Attribute one batch of encoded examples with one method and compute every metric that
    applies to it (each metric's ``applies_to``), one value per example: the building block
    of :func:`evaluate` and of the benchmark runner.

    Args:
        answers: the answers' texts to report (``None`` entries: their token ids decoded).
        exact: exact Shapley values shared across methods (``shapley_error``'s reference);
            ``None``: a cache for this call only.
        roles: each prompt's per-character roles, the task's ground truth for plausibility
            (``None``: parsed from the prompt where the arithmetic parser reads it).
        sources: each prompt's source features (the plausibility positives; the other
            features are negatives), instead of ``roles``.
        keep_errors: an example whose target score or scores are not finite is reported in
            ``errors`` (and left out of the metrics) instead of stopping the batch.
    """
    runner = runner if runner is not None else build_method(method, dict(params))
    fn, fn_name = target_function(target_fn)
    exact = exact if exact is not None else ExactShapleyCache()
    n = len(encoded)
    texts = texts_of(lm, answers, [e.answer_ids for e in encoded])

    def run(model_lm: LanguageModel, batch, rows: Sequence[int], keep: bool) -> list[Attribution]:
        return attribute_collated(
            model_lm, batch, [encoded[i] for i in rows], [prompts[i] for i in rows],
            [texts[i] for i in rows], [None] * len(rows), runner, method, fn, fn_name, baseline,
            [seeds[i] for i in rows], pass_sizes(model_lm, batch, batch_size, None),
            keep_errors=keep, states_budget=states_budget(model_lm.device),
        )  # fmt: skip

    batch = collate(lm.tokenizer, encoded).to(lm.device)
    all_attrs = run(lm, batch, range(n), keep_errors)
    errors = {i: a.error for i, a in enumerate(all_attrs) if a.error is not None}
    good = [i for i in range(n) if i not in errors]
    if not good:
        return BatchScores(all_attrs, {}, None, errors)
    if errors:  # the metrics see the examples that scored, as a batch of their own
        batch = collate(lm.tokenizer, [encoded[i] for i in good]).to(lm.device)
    attrs = [all_attrs[i] for i in good]
    keys = [example_key(encoded[i]) for i in good]
    problem = batch_problem(lm, batch, baseline, target_fn, [seeds[i] for i in good], batch_size)
    mask = problem.lead_mask.cpu()  # where each feature's value sits
    scores = _full_scores(attrs, mask).to(lm.device)
    if runner.gives_exact_shapley:
        exact.put(keys, mask, scores)
    names = [m for m in metrics if applies(m, method)]

    def random_scores() -> Tensor:
        if random_model is None:
            raise ValueError("randomization_spearman needs the re-initialised model")
        rand = run(random_model, batch, good, True)  # a NaN on the random model: NaN, not a stop
        return _full_scores(rand, mask)

    inputs = MetricInputs(
        problem=problem,
        scores=scores,
        method=runner,
        labels=_labels(encoded, prompts, roles, sources, good, mask),
        exact_shapley=lambda: exact.reference(keys, problem),
        random_scores=random_scores,
    )
    values: dict[str, Tensor] = {}
    for name in names:
        metric = METRICS[name](**dict((metric_params or {}).get(name) or {}))
        metric.update(inputs)
        v = metric.per_example().cpu()
        if errors:  # back to one row per example of the batch, NaN for the failed ones
            full = torch.full((n, *v.shape[1:]), math.nan, dtype=v.dtype)
            full[torch.tensor(good)] = v
            v = full
        values[name] = v
    per_example: list[dict[str, list[float]] | None] | None = None
    if inputs.computed("curves"):  # f at each step: deletion from f(x), insertion from f(baseline)
        curves = inputs.curves()
        per_example = [None] * n
        for j, b in enumerate(good):
            per_example[b] = {
                "deletion": curves.deletion[j, : int(curves.n[j]) + 1].tolist(),
                "insertion": curves.insertion[j, : int(curves.n[j]) + 1].tolist(),
            }
    return BatchScores(all_attrs, values, per_example, errors)


def _full_scores(attrs: Sequence[Attribution], feature_mask: Tensor) -> Tensor:
    """Attribution scores back in the batch layout: each feature's score on its first column
    (``feature_mask``: those columns). ``[batch, seq]`` float32, 0 elsewhere."""
    out = torch.zeros(feature_mask.shape, dtype=torch.float32)
    mask = feature_mask.cpu()
    for b, a in enumerate(attrs):
        out[b, mask[b]] = a.scores.float()
    return out


def _labels(
    encoded: Sequence[Encoded],
    prompts: Sequence[str],
    roles: Sequence[Sequence[str] | None] | None,
    sources: Sequence[Sequence[int] | None] | None,
    rows: Sequence[int],
    feature_mask: Tensor,
) -> Tensor:
    """The task's ground truth per feature in the batch layout (``feature_mask``: each
    feature's first column): ``[batch, seq]`` long, 1 / 0 / -1, -1 off the features and for
    unlabelled prompts. A prompt's ``sources`` are its positives and its other features the
    negatives; without them, the arithmetic relevance of its tokens
    (:func:`tokattr.data.labels.relevance`), a feature of several tokens taking the highest
    label among them."""
    out = torch.full(feature_mask.shape, -1, dtype=torch.long)
    for b, i in enumerate(rows):
        e = encoded[i]
        n = int(feature_mask[b].sum())
        src = None if sources is None else sources[i]
        if src is not None:
            value = [1 if j in set(src) else 0 for j in range(n)]
        else:
            offsets = [o for o, special in zip(e.offsets, e.special, strict=True) if not special]
            value = relevance(prompts[i], offsets, None if roles is None else roles[i])
            if value is not None and e.feature_of is not None:
                of = [f for f, special in zip(e.feature_of, e.special, strict=True) if not special]
                grouped = [-1] * n
                for f, v in zip(of, value, strict=True):
                    if f >= 0:
                        grouped[f] = max(grouped[f], v)
                value = grouped
        if value is not None:
            out[b, feature_mask[b]] = torch.tensor(value, dtype=torch.long)
    return out


def check_sources(
    sources: Sequence[Sequence[int] | None] | None, n_prompts: int
) -> list[Sequence[int] | None]:
    """One list of source feature indices (or ``None``) per prompt."""
    if sources is None:
        return [None] * n_prompts
    out = list(sources)
    if len(out) != n_prompts:
        raise ValueError(f"{len(out)} source lists for {n_prompts} prompts")
    for i, src in enumerate(out):
        if src is not None and not all(isinstance(j, int) for j in src):
            raise ValueError(f"prompt {i}: sources must be feature indices, got {src!r}")
    return out


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_description(self, desc: str) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool) -> object:  # tqdm, or a stand-in when disabled
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="example", dynamic_ncols=True)
