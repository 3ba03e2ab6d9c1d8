"""Attribution methods, one file each; every one has one verb, ``attribute(problem)``.

A method's hyper-parameters go to its ``__init__``; ``attribute`` takes an
:class:`~tokattr.methods.problem.AttributionProblem` (embeddings, baselines, features and a
target function) and returns per-token scores. Use them through :func:`tokattr.attribute`.
"""

from __future__ import annotations

from tokattr.methods.attention import Attention, AttentionRollout
from tokattr.methods.attnlrp import CPLRP, AttnLRP
from tokattr.methods.context_cite import ContextCite
from tokattr.methods.exact_shapley import ExactShapley
from tokattr.methods.gradient_shap import GradientShap
from tokattr.methods.input_x_gradient import InputXGradient
from tokattr.methods.integrated_gradients import IntegratedGradients
from tokattr.methods.kernel_shap import KernelShap
from tokattr.methods.lime import Lime
from tokattr.methods.noise_tunnel import SmoothGrad, VarGrad
from tokattr.methods.occlusion import Occlusion
from tokattr.methods.problem import AttributionProblem, Method, MethodOutput
from tokattr.methods.random_baseline import RandomAttribution
from tokattr.methods.saliency import Saliency
from tokattr.methods.shapley_sampling import ShapleyValueSampling
from tokattr.methods.value_zeroing import ValueZeroing

METHODS: dict[str, type[Method]] = {
    "integrated_gradients": IntegratedGradients,
    "saliency": Saliency,
    "input_x_gradient": InputXGradient,
    "occlusion": Occlusion,
    "kernel_shap": KernelShap,
    "shapley_sampling": ShapleyValueSampling,
    "exact_shapley": ExactShapley,
    "context_cite": ContextCite,
    "gradient_shap": GradientShap,
    "smoothgrad": SmoothGrad,
    "vargrad": VarGrad,
    "lime": Lime,
    "attention": Attention,
    "attention_rollout": AttentionRollout,
    "value_zeroing": ValueZeroing,
    "attnlrp": AttnLRP,
    "cp_lrp": CPLRP,
    "random": RandomAttribution,
}
"""Method name -> method class (explicit; no discovery)."""

__all__ = [
    "CPLRP",
    "METHODS",
    "Attention",
    "AttentionRollout",
    "AttnLRP",
    "AttributionProblem",
    "ContextCite",
    "ExactShapley",
    "GradientShap",
    "InputXGradient",
    "IntegratedGradients",
    "KernelShap",
    "Lime",
    "Method",
    "MethodOutput",
    "Occlusion",
    "RandomAttribution",
    "Saliency",
    "ShapleyValueSampling",
    "SmoothGrad",
    "ValueZeroing",
    "VarGrad",
]
