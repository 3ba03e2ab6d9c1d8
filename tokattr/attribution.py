"""``attribute``: prompts -> token batch -> target function -> method -> one Attribution each."""

from __future__ import annotations

import inspect
import math
import numbers
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tokattr.batching import (
    Answer,
    Encoded,
    TokenBatch,
    check_prompt,
    collate,
    encode_examples,
    is_token_ids,
    quote,
)
from tokattr.engine.cache import Prefix
from tokattr.engine.capabilities import supports_branches, supports_prefix
from tokattr.engine.packing import Branches
from tokattr.engine.tail import tail_mlp
from tokattr.memory import ModelShape, sequences_per_pass
from tokattr.methods import METHODS
from tokattr.methods.problem import AttributionProblem, Method, chunked
from tokattr.models import LanguageModel
from tokattr.targets import TARGETS, TargetFunction, TargetInputs, contrast, target_inputs

BASELINES = ("pad", "unk", "zero")
"""How a removed token is replaced: the pad token's embedding (default), the unk token's, or
the zero vector. Its position id is kept."""

DEFAULT_BATCH_SIZE = 64


@dataclass(frozen=True, eq=False)
class Attribution:
    """One prompt's token attributions.

    ``scores[i]`` belongs to ``tokens[i]``, the prompt's tokens as the tokenizer spells them
    (BOS and other special tokens are never features). With ``per_answer_token=True``,
    ``scores`` has one row per answer token (``[len(answer_tokens), len(tokens)]``) and
    ``target_score`` / ``delta`` are lists with one entry per answer token.

    ``answer_ids`` are the answer's tokens exactly as scored (for the greedy answer, the ids
    the model generated); ``target`` is their text.
    """

    tokens: list[str]
    scores: Tensor  # [len(tokens)] float32 CPU ([len(answer_tokens), len(tokens)] per token)
    target: str  # the answer attributed
    method: str
    prompt: str
    token_ids: list[int]
    offsets: list[tuple[int, int]]  # character span of each token in the prompt
    answer_tokens: list[str]
    target_fn: str  # which target function: log_prob, prob, logit, contrast
    target_score: float | list[float]  # f(x), the target on the unperturbed prompt
    baseline: str
    params: dict[str, object] = field(default_factory=dict)  # the method's hyper-parameters
    seed: int | None = None
    model_evals: int = 0  # sequences this prompt put through the model (forward passes)
    time_ms: float = 0.0  # wall time, shared equally by the rows computed together
    delta: float | list[float] | None = None  # IG: sum(scores) - (f(x) - f(baseline))
    foil: str | None = None
    answer_ids: list[int] = field(default_factory=list)  # the answer's token ids, as attributed
    error: str | None = None  # why the scores are not finite (only where errors are kept)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict (scores as nested lists)."""
        out = {k: v for k, v in self.__dict__.items() if k != "scores"}
        out["scores"] = self.scores.tolist()
        out["offsets"] = [list(o) for o in self.offsets]
        return out


def method_parameters(method: str) -> dict[str, inspect.Parameter]:
    """The hyper-parameters a method takes, by name."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    params = inspect.signature(METHODS[method].__init__).parameters
    return {
        k: p
        for k, p in params.items()
        if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def build_method(method: str, params: dict[str, object]) -> Method:
    """An instance of ``METHODS[method]`` with ``params``, refusing unknown parameters."""
    valid = method_parameters(method)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for method {method!r}; it takes "
            f"{sorted(valid) or 'no parameters'}"
        )
    return METHODS[method](**params)


def attribute(
    lm: LanguageModel,
    prompts: str | Sequence[str],
    method: str = "integrated_gradients",
    target: Answer | Sequence[Answer | None] | None = None,
    baseline: str = "pad",
    seed: int | Sequence[int | None] | None = None,
    batch_size: int | None = None,
    *,
    target_fn: str | TargetFunction = "log_prob",
    foil: Answer | Sequence[Answer] | None = None,
    per_answer_token: bool = False,
    memory_budget: int | None = None,
    max_new_tokens: int | None = None,
    **method_params: object,
) -> Attribution | list[Attribution]:
    """Attribute the model's score of an answer to each token of the prompt.

    Args:
        lm: the model and tokenizer (:func:`tokattr.load_model`).
        prompts: one prompt (-> one :class:`Attribution`) or a list (-> a list).
        method: a name in :data:`tokattr.METHODS`.
        target: the answer to attribute, one per prompt: a string, tokenized once in context
            (``prompt + target``; ``"Paris"`` vs ``" Paris"`` matters), or its token ids, used
            as they are. ``None`` (or ``None`` for a prompt in the list): the model's greedy
            answer, the token ids it generates up to a stop token
            (:func:`tokattr.accuracy.greedy_answer_ids`).
        baseline: what replaces a removed token's embedding: ``"pad"`` (default), ``"unk"`` or
            ``"zero"``; its position is kept. Used by every method except saliency,
            input_x_gradient and random.
        seed: seeds random methods (kernel_shap, shapley_sampling, random). An int seeds every
            prompt with that value; a list gives each prompt its own (e.g. its example id), so a
            prompt's scores do not depend on the other prompts. ``None``: global RNG.
        batch_size: the most sequences in one forward pass (IG steps, perturbations and
            prompts are packed up to it), and the most prompts attributed together. ``None``
            (default): sized to ``memory_budget`` from the model's shape and the batch's
            length (:mod:`tokattr.memory`), 64 prompts together.
        target_fn: ``"log_prob"`` (default: sum of the answer tokens' log-probabilities),
            ``"prob"``, ``"logit"`` (first answer token), ``"contrast"`` (log p(target) -
            log p(foil)), or a :data:`~tokattr.targets.TargetFunction`.
        foil: the contrasting answer(s) (strings or token ids), for ``target_fn="contrast"``.
        per_answer_token: attribute each answer token's score on its own (one row each).
        memory_budget: bytes a pass may use for activations; ``None``: 60% of the free GPU
            memory, or on a CPU a quarter of the available RAM (at most 4 GiB). Caps
            ``batch_size`` too when both are given. On a GPU a pass that runs out of memory
            anyway is retried at half the size.
        max_new_tokens: the longest greedy answer (default: the model's generation config,
            else 12 tokens).
        **method_params: the method's hyper-parameters, e.g. ``n_steps=64``.

    Raises:
        ValueError: unknown method, method parameter, baseline or target function; an empty
            prompt; a prompt (checked before any generation) or prompt + answer longer than
            ``lm.max_length``; an answer that changes the prompt's tokens; ``exact_shapley`` on
            too many tokens; NaN or inf scores (the message says whether the model's logits or
            the answer's probability is the cause).
        TypeError: a prompt that is not a string (e.g. a tokenizer's ``BatchEncoding``).
    """
    runner = build_method(method, method_params)
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose from {BASELINES}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if memory_budget is not None and (not isinstance(memory_budget, int) or memory_budget < 1):
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    fn, fn_name = _target_function(target_fn)
    if lm.model.training:
        raise ValueError(
            "the model is in training mode (dropout would randomise scores); call .eval()"
        )

    single = isinstance(prompts, str)
    if isinstance(prompts, Mapping):
        raise TypeError(
            f"prompts must be a string or a list of strings, got {type(prompts).__name__} "
            "(a tokenizer's output?): pass the text"
        )
    prompt_list = [prompts] if single else list(prompts)
    if not prompt_list:
        raise ValueError("no prompts given")
    for p in prompt_list:
        check_prompt(p)
    answers = _per_prompt(target, prompt_list, "target")
    foils = _per_prompt(foil, prompt_list, "foil")
    seeds = _per_prompt_seed(seed, len(prompt_list))
    if (fn is contrast) != (foils[0] is not None):
        raise ValueError(
            "target_fn='contrast' needs a foil for every prompt"
            if fn is contrast
            else "a foil is only used with target_fn='contrast'"
        )
    if per_answer_token and fn is contrast:
        raise ValueError("per_answer_token does not apply to the contrast target")
    answers = fill_greedy_answers(lm, prompt_list, answers, max_new_tokens)
    encoded = encode_examples(lm.tokenizer, prompt_list, answers, foils, lm.max_length)
    results = _attribute_encoded(
        lm,
        encoded,
        prompt_list,
        [a if isinstance(a, str) else None for a in answers],
        [f if isinstance(f, str) else None for f in foils],
        runner,
        method,
        fn,
        fn_name,
        baseline,
        seeds,
        batch_size,
        memory_budget,
        per_answer_token,
    )
    return results[0] if single else results


def fill_greedy_answers(
    lm: LanguageModel,
    prompts: Sequence[str],
    answers: Sequence[Answer | None],
    max_new_tokens: int | None = None,
) -> list[Answer]:
    """``answers`` with each ``None`` replaced by the model's greedy answer to its prompt (the
    generated token ids). Every prompt's length is checked in tokens before any generation.

    Raises:
        ValueError: a prompt with no room for an answer in the model's context, or an empty
            greedy answer (the model stops at once).
    """
    from tokattr.accuracy import greedy_answer_ids, prompt_token_ids

    ids = prompt_token_ids(lm, prompts)  # lengths first: no generation for a prompt too long
    missing = [i for i, a in enumerate(answers) if a is None]
    out: list[Answer] = [a for a in answers]  # type: ignore[misc]
    if missing:
        greedy = greedy_answer_ids(lm, [ids[i] for i in missing], max_new_tokens)
        for i, g in zip(missing, greedy, strict=True):
            if not g:
                raise ValueError(
                    f"the model's greedy answer to {quote(prompts[i])} is empty (it stops at "
                    "once); pass target="
                )
            out[i] = g
    return out


def answer_text(lm: LanguageModel, answer: Answer) -> str:
    """An answer as text: a string as given, token ids decoded as they are (no stripping)."""
    if isinstance(answer, str):
        return answer
    ids = answer.tolist() if isinstance(answer, Tensor) else list(answer)
    return lm.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _attribute_encoded(
    lm: LanguageModel,
    encoded: Sequence[Encoded],
    prompts: Sequence[str],
    answers: Sequence[str | None] | None,
    foils: Sequence[str | None] | None,
    runner: Method,
    method: str,
    fn: TargetFunction,
    fn_name: str,
    baseline: str,
    seeds: Sequence[int | None],
    batch_size: int | None,
    memory_budget: int | None,
    per_answer_token: bool = False,
    keep_errors: bool = False,
) -> list[Attribution]:
    """Attribute encoded examples (:func:`~tokattr.batching.encode_examples`), in batches of
    ``batch_size`` prompts (default :data:`DEFAULT_BATCH_SIZE`). ``answers`` / ``foils``: the
    texts to report where given as strings (``None``: the ids decoded). ``keep_errors``: an example
    whose target score or scores are not finite gets an :class:`Attribution` with its
    ``error`` set instead of raising (the benchmark writes it as an error row)."""
    prompts_per_batch = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    n = len(encoded)
    texts = [
        a if a is not None else answer_text(lm, e.answer_ids)
        for a, e in zip(answers or [None] * n, encoded, strict=True)
    ]
    foil_texts = [
        None if e.foil_ids is None else f if f is not None else answer_text(lm, e.foil_ids)
        for f, e in zip(foils or [None] * n, encoded, strict=True)
    ]
    results: list[Attribution] = []
    for start in range(0, len(encoded), prompts_per_batch):
        stop = min(start + prompts_per_batch, len(encoded))
        batch = collate(lm.tokenizer, encoded[start:stop]).to(lm.device)
        results += _attribute_batch(
            lm,
            batch,
            runner,
            fn,
            baseline,
            list(seeds[start:stop]),
            pass_sizes(lm, batch, batch_size, memory_budget),
            per_answer_token,
            meta=dict(
                method=method,
                prompts=list(prompts[start:stop]),
                answers=texts[start:stop],
                answer_ids=[list(e.answer_ids) for e in encoded[start:stop]],
                foils=foil_texts[start:stop],
                fn_name=fn_name,
                params={k: getattr(runner, k) for k in method_parameters(method)},
                keep_errors=keep_errors,
            ),
        )
    return results


def _attribute_batch(
    lm: LanguageModel,
    batch: TokenBatch,
    runner: Method,
    fn: TargetFunction,
    baseline: str,
    seeds: list[int | None],
    sizes: tuple[int, int],
    per_answer_token: bool,
    meta: dict,
) -> list[Attribution]:
    n_examples = batch.input_ids.shape[0]
    model = lm.model
    device = batch.input_ids.device
    embeds, baselines = embeddings_and_baselines(lm, batch, baseline)

    inputs = target_inputs(batch, per_answer_token)  # one row per example or answer token
    row_of = inputs.example_index
    passes = 2 if fn is contrast else 1
    evals = torch.zeros(n_examples, dtype=torch.long)
    millis = torch.zeros(n_examples, dtype=torch.float64)

    def forward(
        x: Tensor, rows: TargetInputs, past: Prefix | None = None, branches: Branches | None = None
    ) -> Tensor:
        seqs = rows.example_index
        if branches is not None:  # each branch is a sequence of its row's example
            seqs = torch.cat([seqs, seqs[branches.rows.to(seqs.device)]])
        evals.add_(passes * torch.bincount(seqs.cpu(), minlength=n_examples))
        if past is None and branches is None:
            return fn(model, x, rows)
        return fn(model, x, rows, past=past, branches=branches)

    batch_size, grad_batch_size = sizes
    row_scores, row_delta, row_fx = [], [], []
    for rows in torch.arange(len(row_of), device=device).split(max(batch_size, n_examples)):
        problem = AttributionProblem(
            forward=forward,
            embeds=embeds[row_of[rows]],
            baselines=baselines[row_of[rows]],
            feature_mask=batch.feature_mask[row_of[rows]],
            inputs=inputs.select(rows),
            batch_size=batch_size,
            seeds=tuple(seeds[b] for b in row_of[rows].tolist()),
            grad_batch_size=grad_batch_size,
            prefix_ok=supports_prefix(lm, fn),
            # Probed only for a method that packs (the probe runs the model once per model).
            branches_ok=getattr(runner, "packs_branches", False) and supports_branches(lm, fn),
            shape=ModelShape.of(model),
        )
        tail_mlp(model)  # its once-per-model probe, outside the method's time
        t0 = time.perf_counter()
        out = runner.attribute(problem)
        elapsed = (time.perf_counter() - t0) * 1000 / len(rows)
        millis.index_add_(
            0, row_of[rows].cpu(), torch.full((len(rows),), elapsed, dtype=torch.float64)
        )
        if out.fx is None:  # f(x) for the report, not counted as the method's evaluations
            at = torch.arange(problem.n_rows, device=device)
            with torch.no_grad():
                parts = chunked(
                    problem.n_rows,
                    batch_size,
                    lambda i, j, at=at, p=problem: fn(
                        model, p.embeds[at[i:j]], p.inputs.select(at[i:j])
                    ),
                )
            row_fx.append(torch.cat(parts).float().cpu())
        else:
            row_fx.append(out.fx.detach().float().cpu())
        row_scores.append(out.scores.detach().float().cpu())
        row_delta.append(None if out.delta is None else out.delta.float().cpu())
    scores = torch.cat(row_scores)  # [rows, seq]
    fx = torch.cat(row_fx)  # [rows]
    delta = None if row_delta[0] is None else torch.cat(row_delta)  # [rows]

    # Per example, its rows' scores at its features: one gather for the whole batch, then views.
    row_of_cpu = row_of.cpu()
    order = torch.argsort(row_of_cpu, stable=True)  # rows grouped by example
    rows_per_example = torch.bincount(row_of_cpu, minlength=n_examples).tolist()
    in_features = batch.feature_mask.cpu()[row_of_cpu[order]]  # [rows, seq]
    flat = scores[order][in_features]  # features of each row, row after row
    per_row = flat.split(in_features.sum(-1).tolist())
    fx = fx[order]
    delta = None if delta is None else delta[order]
    bad_fx = ~torch.isfinite(fx)
    bad_scores = ~torch.isfinite(flat)
    errors: dict[int, str] = {}
    if bool(bad_fx.any() or bad_scores.any()):
        errors = _not_finite(meta, rows_per_example, fx, bad_fx, per_row)
        if not meta.get("keep_errors"):
            raise ValueError(next(iter(errors.values())))
    fx_list = fx.tolist()
    delta_list = None if delta is None else delta.tolist()

    results = []
    first = 0
    for b, n_rows in enumerate(rows_per_example):
        mine = slice(first, first + n_rows)
        first += n_rows
        s = torch.stack(per_row[mine]) if per_answer_token else per_row[mine.start].clone()
        d = None if delta_list is None else delta_list[mine]
        results.append(
            Attribution(
                tokens=batch.tokens[b],
                scores=s,  # [rows of b, n_tokens] (per_answer_token) or [n_tokens]
                target=meta["answers"][b],
                method=meta["method"],
                prompt=meta["prompts"][b],
                token_ids=batch.token_ids[b],
                offsets=batch.offsets[b],
                answer_tokens=batch.answer_tokens[b],
                target_fn=meta["fn_name"],
                target_score=fx_list[mine] if per_answer_token else fx_list[mine.start],
                baseline=baseline,
                params=meta["params"],
                seed=seeds[b],
                model_evals=int(evals[b]),
                time_ms=float(millis[b]),
                delta=d if per_answer_token or d is None else d[0],
                foil=meta["foils"][b],
                answer_ids=meta["answer_ids"][b],
                error=errors.get(b),
            )
        )
    return results


def _not_finite(
    meta: dict,
    rows_per_example: list[int],
    fx: Tensor,
    bad_fx: Tensor,
    per_row: Sequence[Tensor],
) -> dict[int, str]:
    """For each example whose target score or scores are not finite, a message naming the
    cause (``fx``, ``bad_fx`` and ``per_row`` hold the rows grouped by example): NaN/inf
    logits, an answer the model gives probability 0, or a method that gives NaN/inf."""
    errors: dict[int, str] = {}
    first = 0
    for b, n_rows in enumerate(rows_per_example):
        mine = slice(first, first + n_rows)
        first += n_rows
        where = f"prompt {quote(meta['prompts'][b])} and answer {quote(meta['answers'][b], 40)}"
        values = fx[mine].tolist()
        if bad_fx[mine].any():
            if any(math.isnan(v) for v in values):
                cause = (
                    "the model's logits are NaN or inf here (its weights or dtype: e.g. a "
                    "float16 overflow)"
                )
            elif any(v == -math.inf for v in values):
                cause = (
                    "the model gives this answer probability 0 (log p = -inf): an impossible "
                    "answer, or -inf logits"
                )
            else:
                cause = "the model's logits are inf here"
            errors[b] = f"the target score is not finite ({values}) for {where}: {cause}"
        elif not all(torch.isfinite(r).all() for r in per_row[mine]):
            errors[b] = (
                f"method {meta['method']!r} gave NaN/inf scores for {where} (the target score "
                f"{values} is finite)"
            )
    return errors


def pass_sizes(
    lm: LanguageModel, batch: TokenBatch, batch_size: int | None, memory_budget: int | None
) -> tuple[int, int]:
    """Sequences per forward pass and per forward + backward pass for this batch: ``batch_size``
    when given (capped by ``memory_budget`` when that is given too), else sized to the budget
    (:func:`tokattr.memory.sequences_per_pass`)."""
    if batch_size is not None and memory_budget is None:
        return batch_size, batch_size
    seq = batch.input_ids.shape[1]
    scored = seq - batch.prompt_width + 1
    sizes = tuple(
        sequences_per_pass(lm.model, seq, grad, memory_budget, scored) for grad in (False, True)
    )
    if batch_size is not None:
        return min(sizes[0], batch_size), min(sizes[1], batch_size)
    return sizes[0], sizes[1]


def embeddings_and_baselines(
    lm: LanguageModel, batch: TokenBatch, baseline: str = "pad"
) -> tuple[Tensor, Tensor]:
    """The batch's input embeddings and their baselines (``baseline`` on the features, the
    inputs elsewhere), both ``[batch, seq, d_model]`` and detached."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose from {BASELINES}")
    layer = lm.model.get_input_embeddings()
    with torch.no_grad():
        embeds = layer(batch.input_ids).detach()  # [batch, seq, d_model]
        base = _baseline_vector(lm, baseline, layer.weight)  # [d_model]
        baselines = torch.where(batch.feature_mask[..., None], base.to(embeds.dtype), embeds)
    return embeds, baselines


def batch_problem(
    lm: LanguageModel,
    batch: TokenBatch,
    baseline: str = "pad",
    target_fn: str | TargetFunction = "log_prob",
    seeds: Sequence[int | None] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> AttributionProblem:
    """One :class:`AttributionProblem` row per example of ``batch``, scoring its whole answer:
    what the faithfulness metrics re-evaluate, with the same baseline rule as the methods."""
    fn, _ = _target_function(target_fn)
    embeds, baselines = embeddings_and_baselines(lm, batch, baseline)
    model = lm.model

    def forward(x: Tensor, rows: TargetInputs) -> Tensor:
        return fn(model, x, rows)

    n = batch.input_ids.shape[0]
    return AttributionProblem(
        forward=forward,
        embeds=embeds,
        baselines=baselines,
        feature_mask=batch.feature_mask,
        inputs=target_inputs(batch),
        batch_size=batch_size,
        seeds=tuple(seeds) if seeds is not None else (None,) * n,
    )


def _target_function(target_fn: str | TargetFunction) -> tuple[TargetFunction, str]:
    if callable(target_fn):
        return target_fn, getattr(target_fn, "__name__", "custom")
    if target_fn not in TARGETS:
        raise ValueError(f"unknown target_fn {target_fn!r}; choose from {sorted(TARGETS)}")
    return TARGETS[target_fn], target_fn


def _baseline_vector(lm: LanguageModel, baseline: str, weight: Tensor) -> Tensor:
    if baseline == "zero":
        return torch.zeros(weight.shape[1], dtype=weight.dtype, device=weight.device)
    token_id = lm.tokenizer.pad_token_id if baseline == "pad" else lm.tokenizer.unk_token_id
    if token_id is None:
        raise ValueError(f"baseline {baseline!r}: the tokenizer has no {baseline} token")
    return weight[token_id].detach()


def _per_prompt(
    value: Answer | Sequence[Answer | None] | None, prompts: list[str], what: str
) -> list[Answer | None]:
    """One answer (or foil) per prompt: a string or token ids for a single prompt, or a list
    with one per prompt (``None`` entries for targets: the greedy answer)."""
    if value is None:
        return [None] * len(prompts)
    if isinstance(value, str) or is_token_ids(value):
        if len(prompts) != 1:
            raise ValueError(
                f"give one {what} per prompt (a list of {len(prompts)}), not one {what}"
            )
        return [value]  # type: ignore[list-item]
    values = list(value)  # type: ignore[arg-type]
    if len(values) != len(prompts):
        raise ValueError(f"{len(values)} {what}s for {len(prompts)} prompts")
    if what == "foil" and any(v is None for v in values):
        raise ValueError("give a foil for every prompt")
    return values


def _per_prompt_seed(seed: int | Sequence[int | None] | None, n: int) -> list[int | None]:
    if seed is None or isinstance(seed, numbers.Integral):
        return [None if seed is None else int(seed)] * n
    seeds = [None if s is None else int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    return seeds
