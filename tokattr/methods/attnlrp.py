"""AttnLRP and CP-LRP: relevance of each input embedding from one forward and one backward
pass through the model with LRP rules (:mod:`tokattr.methods.lrp`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from tokattr.engine.scoring import answer_logits
from tokattr.methods.internals import needs_model
from tokattr.methods.lrp import lrp_rules
from tokattr.methods.problem import AttributionProblem, Method, MethodOutput
from tokattr.targets import LOGIT_SUM, TargetInputs

EXPLAINED = ("logits", "target")
"""What the relevance explains: the answer tokens' logits (LRP's output, default) or the run's
target function."""


def _logit_sum(model: nn.Module, problem: AttributionProblem) -> Callable[..., Tensor]:
    """A problem forward whose value is the sum of the answer tokens' teacher-forced logits
    (each pass reported to the problem's ``count``)."""

    def forward(x: Tensor, rows: TargetInputs, past: object = None, branches: object = None):
        if problem.count is not None:
            problem.count(rows)
        logits = answer_logits(
            model, x, rows.attention_mask, rows.position_ids, rows.labels, rows.score_mask
        )
        return logits.sum(-1)

    return forward


class AttnLRP(Method):
    """AttnLRP: Achtibat, Hatefi, Dreyer, Jain, Wiegand, Lapuschkin & Samek, "AttnLRP:
    Attention-Aware Layer-Wise Relevance Propagation for Transformers", ICML 2024.

    Inside :func:`~tokattr.methods.lrp.lrp_rules` (this model instance only, undone after) the
    backward pass follows the paper's rules in their efficient gradient x input form (identity
    rule through norms and element-wise non-linearities, the uniform rule on the gated MLP's
    product and on attention's two matrix products); the relevance of a feature token is its
    input embedding times the gradient of the explained output there, summed over ``d_model``
    (signed). One forward and one backward pass per ``grad_batch`` rows, like input x gradient.

    What is explained: LRP explains a logit (the paper and its code explain the predicted
    token's logit), so by default (``explain="logits"``) the relevance is that of the sum of the
    answer tokens' teacher-forced logits, whatever the run's target function (which the
    metrics still score); ``explain="target"`` backpropagates the run's target instead (for the
    default log-probability that adds the log-sum-exp over the vocabulary, which no LRP rule
    covers).

    Conservation, per row (``delta``, like IG's): the relevance of every column of the row (BOS
    and the answer's tokens included, not only the features) minus the explained output. On a
    bias-free model every rule conserves relevance but the softmax of attention (AttnLRP's
    softmax rule leaves a bias term), so ``delta`` measures what the softmaxes absorb (and,
    with GPT-2, what its learned position embeddings take). Families with rules: Llama,
    Mistral, Qwen2, Gemma-style norms, GPT-2, GPT-NeoX; any other: a clear error.

    Args:
        explain: ``"logits"`` (default) or ``"target"``.
    """

    variant = "attnlrp"

    def __init__(self, explain: str = "logits") -> None:
        if explain not in EXPLAINED:
            raise ValueError(f"{self.variant}: explain must be one of {EXPLAINED}, got {explain!r}")
        self.explain = explain

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        model = needs_model(problem, self.variant)
        if self.explain == "logits":
            problem = dataclasses.replace(
                problem,
                forward=_logit_sum(model, problem),
                # per_answer_token rows share passes through the same sum of logits
                token_form=None if problem.token_form is None else LOGIT_SUM,
            )
        with lrp_rules(model, self.variant):
            fx, grad = problem.gradients()  # [batch], [batch, seq, d_model]
        relevance = (problem.embeds.float() * grad.float()).sum(-1)  # [batch, seq]
        attended = problem.inputs.attention_mask.bool().to(relevance.device)
        delta = torch.where(attended, relevance, 0.0).double().sum(-1) - fx.double()
        scores = torch.where(problem.feature_mask, relevance, torch.zeros_like(relevance))
        # f(x) is the run's target only where that is what was explained.
        own = fx.float() if self.explain == "target" else None
        return MethodOutput(scores, delta=delta.float(), fx=own)


class CPLRP(AttnLRP):
    """CP-LRP: Ali, Schnake, Eberle, Montavon, Müller & Wolf, "XAI for Transformers: Better
    Explanations through Conservative Propagation", ICML 2022 (in AttnLRP's efficient form).

    As :class:`AttnLRP`, but attention weights and the gates of gated MLPs are held constant
    (no relevance through queries, keys or gates): the backward graph is then linear in the
    input embeddings, so on a bias-free model (without learned position embeddings) ``delta``
    is zero up to rounding.
    """

    variant = "cp_lrp"
