"""``attribute``: prompts -> token batch -> target function -> method -> one Attribution each."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tokattr.answers import fill_greedy_answers, texts_of
from tokattr.batching import Answer, Encoded, Features, TokenBatch, collate, encode_examples
from tokattr.chat import DEFAULT_ROLES, chat_prompts
from tokattr.engine.cache import Prefix
from tokattr.engine.capabilities import supports_branches, supports_prefix
from tokattr.engine.checkpoint import checkpointed, needs_checkpointing
from tokattr.engine.memory import ModelShape, states_budget
from tokattr.engine.packing import Branches
from tokattr.engine.tail import tail_mlp
from tokattr.messages import quote
from tokattr.methods.problem import AttributionProblem, Method, chunked
from tokattr.models import LanguageModel
from tokattr.problems import (
    DEFAULT_BATCH_SIZE,
    embeddings_and_baselines,
    pass_sizes,
    target_forward,
)
from tokattr.targets import (
    TOKEN_FORMS,
    TargetFunction,
    TargetInputs,
    contrast,
    log_prob,
    target_inputs,
)
from tokattr.validation import (
    build_method,
    check_baseline,
    check_positive_int,
    method_parameters,
    per_prompt,
    per_prompt_features,
    per_prompt_seed,
    prompt_list,
    target_function,
)

GRADIENT_METHODS = frozenset(
    {"saliency", "input_x_gradient", "integrated_gradients", "gradient_shap", "smoothgrad",
     "vargrad"}
)  # fmt: skip
"""The methods whose passes keep activations for a backward pass: the ones that
``gradient_checkpointing`` applies to (AttnLRP and CP-LRP rewrite the backward pass
themselves and run one pass per prompt)."""


@dataclass(frozen=True, eq=False)
class Attribution:
    """One prompt's attributions, one score per feature.

    ``scores[i]`` belongs to ``features[i]``, whose character span in the prompt is
    ``spans[i]``. With ``features="token"`` (the default) the features are the prompt's
    tokens as the tokenizer spells them (BOS and other special tokens are never features), so
    ``features == tokens`` and ``spans == offsets``; with words, sentences, lines, separated
    parts or explicit spans (:mod:`tokattr.features`) a feature is a group of tokens and
    ``token_features[j]`` is the feature of ``tokens[j]`` (-1: context, never removed). With
    ``per_answer_token=True``, ``scores`` has one row per answer token
    (``[len(answer_tokens), len(features)]``) and ``target_score`` / ``delta`` are lists with
    one entry per answer token.

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
    features: list[str] = field(default_factory=list)  # each feature's text ("token": tokens)
    spans: list[tuple[int, int]] = field(default_factory=list)  # each feature's character span
    token_features: list[int] = field(default_factory=list)  # feature of each token, -1: none
    granularity: str = "token"  # token, word, sentence, line, separator:<s> or spans

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict (scores as nested lists)."""
        out = {k: v for k, v in self.__dict__.items() if k != "scores"}
        out["scores"] = self.scores.tolist()
        out["offsets"] = [list(o) for o in self.offsets]
        out["spans"] = [list(o) for o in self.spans]
        return out


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
    features: Features | Sequence[Features] = "token",
    feature_roles: Sequence[str] = DEFAULT_ROLES,
    gradient_checkpointing: bool | None = None,
    **method_params: object,
) -> Attribution | list[Attribution]:
    """Attribute the model's score of an answer to each feature of the prompt: each token
    (default), word, sentence, line, part between separators, or given character span.

    Args:
        lm: the model and tokenizer (:func:`tokattr.load_model`).
        prompts: one prompt (-> one :class:`Attribution`) or a list (-> a list). A prompt is
            text, or a chat: a list of ``{"role", "content"}`` messages, rendered with the
            tokenizer's chat template (``add_generation_prompt=True``) and attributed to the
            contents of the roles in ``feature_roles`` only (:mod:`tokattr.chat`); the
            template's own tokens are never features nor removed.
        method: a name in :data:`tokattr.METHODS`.
        target: the answer to attribute, one per prompt: a string, tokenized once in context
            (``prompt + target``; ``"Paris"`` vs ``" Paris"`` matters), or its token ids, used
            as they are. ``None`` (or ``None`` for a prompt in the list): the model's greedy
            answer, the token ids it generates up to a stop token
            (:func:`tokattr.answers.greedy_answer_ids`).
        baseline: what replaces a removed token's embedding: ``"pad"`` (default), ``"unk"`` or
            ``"zero"``; its position is kept. Used by every method except saliency,
            input_x_gradient and random.
        seed: seeds random methods (kernel_shap, shapley_sampling, random). An int seeds every
            prompt with that value; a list gives each prompt its own (e.g. its example id), so a
            prompt's scores do not depend on the other prompts. ``None``: global RNG.
        batch_size: the most sequences in one forward pass (IG steps, perturbations and
            prompts are packed up to it; a pass that re-runs perturbations from a shared
            prefix holds as many tokens, so more of them), and the most prompts attributed
            together. ``None``
            (default): sized to ``memory_budget`` from the model's shape and the batch's
            length (:mod:`tokattr.engine.memory`), 64 prompts together.
        target_fn: ``"log_prob"`` (default: sum of the answer tokens' log-probabilities),
            ``"prob"``, ``"logit"`` (first answer token), ``"contrast"`` (log p(target) -
            log p(foil)), or a :data:`~tokattr.targets.TargetFunction`.
        foil: the contrasting answer(s) (strings or token ids), for ``target_fn="contrast"``.
        per_answer_token: attribute each answer token's score on its own (one row each).
        memory_budget: bytes a pass may use for activations; ``None``: 60% of the free GPU
            memory, or on a CPU a quarter of the available RAM (at most 4 GiB). Caps
            ``batch_size`` too when both are given. On a GPU a pass that runs out of memory
            anyway is retried at half the size. The key/value states that perturbation
            methods keep to re-run only changed columns come on top: at most a quarter of it
            for each of their two uses, the parents kept between waves and one pass's cached
            columns (on a CPU at most 512 MiB each,
            :func:`tokattr.engine.memory.states_budget`).
        max_new_tokens: the longest greedy answer (default: the model's generation config,
            else 12 tokens).
        gradient_checkpointing: a gradient method recomputes each decoder layer in its
            backward pass instead of keeping its activations
            (:mod:`tokattr.engine.checkpoint`): about one more forward pass of compute, a
            fraction of the memory. ``None`` (default): on when ``memory_budget`` is given
            and one sequence's forward and backward pass is estimated not to fit in it.
        features: what gets a score (:mod:`tokattr.features`): ``"token"`` (default),
            ``"word"``, ``"sentence"``, ``"line"``, ``"separator:<s>"`` (the parts between
            occurrences of ``s``, e.g. ``"separator:;"`` between demonstrations), or explicit
            ``[(start, end), ...]`` character spans; one for every prompt, or a list with one
            per prompt. A token belongs to the feature holding its first non-space character;
            characters outside every feature are context, never removed. Perturbation
            methods remove a feature's tokens together; gradient methods sum its tokens'
            scores. For a chat prompt, the granularity inside each content (and
            ``"message"``: each content whole).
        feature_roles: the roles of a chat prompt whose contents are features (default:
            the user's).
        **method_params: the method's hyper-parameters, e.g. ``n_steps=64``.

    Raises:
        ValueError: unknown method, method parameter, baseline or target function; an empty
            prompt; a prompt (checked before any generation) or prompt + answer longer than
            ``lm.max_length``; an answer that changes the prompt's tokens; ``exact_shapley`` on
            too many tokens; NaN or inf scores (the message says whether the model's logits or
            the answer's probability is the cause); features that do not exist, spans out of
            range, overlapping or holding no token (all before any model call).
        TypeError: a prompt that is not a string (e.g. a tokenizer's ``BatchEncoding``).
    """
    runner = build_method(method, method_params)
    check_baseline(baseline)
    check_positive_int(batch_size, "batch_size", optional=True)
    if memory_budget is not None and (not isinstance(memory_budget, int) or memory_budget < 1):
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    fn, fn_name = target_function(target_fn)
    if lm.model.training:
        raise ValueError(
            "the model is in training mode (dropout would randomise scores); call .eval()"
        )
    single, prompts, features = chat_prompts(lm.tokenizer, prompts, features, feature_roles)
    prompts_ = prompt_list(prompts)
    answers = per_prompt(target, len(prompts_), "target")
    foils = per_prompt(foil, len(prompts_), "foil")
    seeds = per_prompt_seed(seed, len(prompts_))
    feature_specs = per_prompt_features(features, prompts_, single)
    if (fn is contrast) != (foils[0] is not None):
        raise ValueError(
            "target_fn='contrast' needs a foil for every prompt"
            if fn is contrast
            else "a foil is only used with target_fn='contrast'"
        )
    if per_answer_token and fn is contrast:
        raise ValueError("per_answer_token does not apply to the contrast target")
    answers = fill_greedy_answers(lm, prompts_, answers, max_new_tokens)
    encoded = encode_examples(lm.tokenizer, prompts_, answers, foils, lm.max_length, feature_specs)
    results = _attribute_encoded(
        lm,
        encoded,
        prompts_,
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
        gradient_checkpointing=gradient_checkpointing,
    )
    return results[0] if single else results


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
    gradient_checkpointing: bool | None = None,
) -> list[Attribution]:
    """Attribute encoded examples (:func:`~tokattr.batching.encode_examples`), in batches of
    ``batch_size`` prompts (default :data:`DEFAULT_BATCH_SIZE`). ``answers`` / ``foils``: the
    texts to report where given as strings (``None``: the ids decoded). ``keep_errors``: an example
    whose target score or scores are not finite gets an :class:`Attribution` with its
    ``error`` set instead of raising (the benchmark writes it as an error row)."""
    prompts_per_batch = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    texts = texts_of(lm, answers, [e.answer_ids for e in encoded])
    foil_texts = texts_of(lm, foils, [e.foil_ids for e in encoded])
    results: list[Attribution] = []
    for start in range(0, len(encoded), prompts_per_batch):
        stop = min(start + prompts_per_batch, len(encoded))
        batch = collate(lm.tokenizer, encoded[start:stop]).to(lm.device)
        checkpoint = gradient_checkpointing
        if checkpoint is None:
            seq = batch.input_ids.shape[1]
            checkpoint = memory_budget is not None and needs_checkpointing(
                lm.model, seq, memory_budget, seq - batch.prompt_width + 1
            )
        results += attribute_collated(
            lm, batch, encoded[start:stop], prompts[start:stop], texts[start:stop],
            foil_texts[start:stop], runner, method, fn, fn_name, baseline, seeds[start:stop],
            pass_sizes(lm, batch, batch_size, memory_budget), per_answer_token, keep_errors,
            checkpoint=checkpoint and method in GRADIENT_METHODS,
            states_budget=states_budget(lm.device, memory_budget),
        )  # fmt: skip
    return results


def attribute_collated(
    lm: LanguageModel,
    batch: TokenBatch,
    encoded: Sequence[Encoded],
    prompts: Sequence[str],
    answers: Sequence[str],
    foils: Sequence[str | None],
    runner: Method,
    method: str,
    fn: TargetFunction,
    fn_name: str,
    baseline: str,
    seeds: Sequence[int | None],
    sizes: tuple[int, int],
    per_answer_token: bool = False,
    keep_errors: bool = False,
    checkpoint: bool = False,
    states_budget: int | None = None,
) -> list[Attribution]:
    """Attribute one collated batch of ``encoded`` examples (``answers`` / ``foils``: the
    texts to report; ``sizes``: sequences per forward and per forward + backward pass;
    ``checkpoint``: the decoder layers recompute their activations in the backward pass,
    :func:`tokattr.engine.checkpoint.checkpointed`; ``states_budget``: bytes of key/value
    states the prefix-sharing passes may hold, :func:`tokattr.engine.memory.states_budget`)."""
    params = {k: getattr(runner, k) for k in method_parameters(method)}
    n_examples = batch.input_ids.shape[0]
    model = lm.model
    device = batch.input_ids.device
    embeds, baselines = embeddings_and_baselines(lm, batch, baseline)

    inputs = target_inputs(batch, per_answer_token)  # one row per example or answer token
    row_of = inputs.example_index
    passes = 2 if fn is contrast else 1
    evals = torch.zeros(n_examples, dtype=torch.long)
    millis = torch.zeros(n_examples, dtype=torch.float64)
    target = target_forward(lm, fn)

    def forward(
        x: Tensor, rows: TargetInputs, past: Prefix | None = None, branches: Branches | None = None
    ) -> Tensor:
        seqs = rows.example_index  # the sequences this call puts through the model, counted
        if branches is not None:  # each branch is a sequence of its row's example
            seqs = torch.cat([seqs, seqs[branches.rows.to(seqs.device)]])
        evals.add_(passes * torch.bincount(seqs.cpu(), minlength=n_examples))
        return target(x, rows, past=past, branches=branches)

    def count(rows: TargetInputs) -> None:
        evals.add_(torch.bincount(rows.example_index.cpu(), minlength=n_examples))

    batch_size, grad_batch_size = sizes
    row_scores, row_delta, row_fx = [], [], []
    size = max(batch_size, n_examples)
    if per_answer_token:  # an example's answer-token rows in one problem: they share passes
        size *= int(torch.bincount(row_of).max())
    for rows in torch.arange(len(row_of), device=device).split(size):
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
            branches_ok=runner.packs_branches and supports_branches(lm, fn),
            shape=ModelShape.of(model),
            feature_ids=None if batch.feature_ids is None else batch.feature_ids[row_of[rows]],
            log_prob_target=fn is log_prob,
            model=model,
            count=count,
            # The rows of one example's answer tokens share their forward passes.
            token_form=TOKEN_FORMS.get(fn) if per_answer_token else None,
            states_budget=states_budget,
        )
        tail_mlp(model)  # its once-per-model probe, outside the method's time
        t0 = time.perf_counter()
        with checkpointed(model) if checkpoint else contextlib.nullcontext():
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
    if batch.feature_ids is None:
        in_features = batch.feature_mask.cpu()[row_of_cpu[order]]  # [rows, seq]
        flat = scores[order][in_features]  # features of each row, row after row
        per_row = flat.split(in_features.sum(-1).tolist())
    else:  # a feature's score: the sum of its tokens' (one nonzero for perturbation methods)
        fid = batch.feature_ids.cpu()[row_of_cpu[order]]  # [rows, seq]
        n_feat = (fid.max(-1).values + 1).clamp(min=0)
        sums = torch.zeros(len(fid), int(n_feat.max()) + 1)
        sums.scatter_add_(1, torch.where(fid >= 0, fid, sums.shape[1] - 1), scores[order])
        per_row = [sums[r, : int(n_feat[r])] for r in range(len(fid))]
        flat = torch.cat(per_row)
    fx = fx[order]
    delta = None if delta is None else delta[order]
    bad_fx = ~torch.isfinite(fx)
    bad_scores = ~torch.isfinite(flat)
    errors: dict[int, str] = {}
    if bool(bad_fx.any() or bad_scores.any()):
        errors = _not_finite(method, prompts, answers, rows_per_example, fx, bad_fx, per_row)
        if not keep_errors:
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
                target=answers[b],
                method=method,
                prompt=prompts[b],
                token_ids=batch.token_ids[b],
                offsets=batch.offsets[b],
                answer_tokens=batch.answer_tokens[b],
                target_fn=fn_name,
                target_score=fx_list[mine] if per_answer_token else fx_list[mine.start],
                baseline=baseline,
                params=params,
                seed=seeds[b],
                model_evals=int(evals[b]),
                time_ms=float(millis[b]),
                delta=d if per_answer_token or d is None else d[0],
                foil=foils[b],
                answer_ids=list(encoded[b].answer_ids),
                error=errors.get(b),
                features=batch.features[b] if batch.features else batch.tokens[b],
                spans=batch.spans[b] if batch.spans else batch.offsets[b],
                token_features=_token_features(encoded[b]),
                granularity=encoded[b].granularity,
            )
        )
    return results


def _token_features(e: Encoded) -> list[int]:
    """The feature of each non-special prompt token (the token itself for single tokens)."""
    keep = [i for i, s in enumerate(e.special) if not s]
    if e.feature_of is None:
        return list(range(len(keep)))
    return [e.feature_of[i] for i in keep]


def _not_finite(
    method: str,
    prompts: Sequence[str],
    answers: Sequence[str],
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
        where = f"prompt {quote(prompts[b])} and answer {quote(answers[b], 40)}"
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
                f"method {method!r} gave NaN/inf scores for {where} (the target score "
                f"{values} is finite)"
            )
    return errors
