"""AttnLRP and CP-LRP: relevance of each input embedding from one forward and one backward
pass through the model with LRP rules (:mod:`tokattr.methods.lrp`)."""

from __future__ import annotations

import torch

from tokattr.methods.internals import needs_model
from tokattr.methods.lrp import lrp_rules
from tokattr.methods.problem import AttributionProblem, Method, MethodOutput


class AttnLRP(Method):
    """AttnLRP: Achtibat, Hatefi, Dreyer, Jain, Wiegand, Lapuschkin & Samek, "AttnLRP:
    Attention-Aware Layer-Wise Relevance Propagation for Transformers", ICML 2024.

    Inside :func:`~tokattr.methods.lrp.lrp_rules` (this model instance only, undone after) the
    backward pass follows the paper's rules in their efficient gradient x input form (identity
    rule through norms and element-wise non-linearities, the uniform rule on the gated MLP's
    product and on attention's two matrix products); the relevance of a feature token is its
    input embedding times the gradient of the target there, summed over ``d_model`` (signed).
    One forward and one backward pass per ``grad_batch`` rows, like input x gradient.

    Conservation, per row (``delta``, like IG's): the relevance of every column of the row (BOS
    and the answer's tokens included, not only the features) minus the target. LRP explains a
    logit: with ``target_fn="logit"`` on a bias-free model the relevance is conserved by every
    rule but the softmax of attention (AttnLRP's softmax rule leaves a bias term), so ``delta``
    measures what the softmaxes absorb; with the default log-probability target it also holds
    the log-sum-exp over the vocabulary, which is not linear. Families with rules: Llama,
    Mistral, Qwen2, Gemma-style norms, GPT-2, GPT-NeoX; any other: a clear error.
    """

    variant = "attnlrp"

    def __init__(self) -> None:
        pass  # no hyper-parameters

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        model = needs_model(problem, self.variant)
        with lrp_rules(model, self.variant):
            fx, grad = problem.gradients()  # [batch], [batch, seq, d_model]
        relevance = (problem.embeds.float() * grad.float()).sum(-1)  # [batch, seq]
        attended = problem.inputs.attention_mask.bool().to(relevance.device)
        delta = torch.where(attended, relevance, 0.0).double().sum(-1) - fx.double()
        scores = torch.where(problem.feature_mask, relevance, torch.zeros_like(relevance))
        return MethodOutput(scores, delta=delta.float(), fx=fx.float())


class CPLRP(AttnLRP):
    """CP-LRP: Ali, Schnake, Eberle, Montavon, Müller & Wolf, "XAI for Transformers: Better
    Explanations through Conservative Propagation", ICML 2022 (in AttnLRP's efficient form).

    As :class:`AttnLRP`, but attention weights and the gates of gated MLPs are held constant
    (no relevance through queries, keys or gates): the backward graph is then linear in the
    input embeddings, so with ``target_fn="logit"`` on a bias-free model ``delta`` is zero up
    to rounding.
    """

    variant = "cp_lrp"
