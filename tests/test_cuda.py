"""On a CUDA device (``cuda``-marked; skipped without one, run by ``scripts/gpu_check.sh``):
every method gives the CPU's scores, and a model split between the GPU and the CPU by
``device_map`` (gradients crossing devices) gives the whole model's."""

from __future__ import annotations

import pytest
import torch

import tokattr
from tokattr.methods import METHODS

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
PROMPTS = ["12+7=", "3x4=", "$16,000/-0.8="]
ANSWERS = ["19", "12", "-20000"]
PARAMS = {"integrated_gradients": {"n_steps": 16}, "kernel_shap": {"n_samples": 32},
          "lime": {"n_samples": 32}, "shapley_sampling": {"n_samples": 4},
          "context_cite": {"n_ablations": 32}, "gradient_shap": {"n_samples": 8},
          "smoothgrad": {"n_samples": 8}, "vargrad": {"n_samples": 8}}  # fmt: skip


@pytest.fixture(scope="module")
def models():
    return tokattr.load_model("arith-tiny"), tokattr.load_model("arith-tiny", device="cuda")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_on_the_gpu_equals_the_cpu(models, method):
    cpu, gpu = models
    params = PARAMS.get(method, {})
    a = tokattr.attribute(cpu, PROMPTS, method, target=ANSWERS, seed=1, **params)
    b = tokattr.attribute(gpu, PROMPTS, method, target=ANSWERS, seed=1, **params)
    for x, y in zip(a, b, strict=True):
        assert y.scores.device.type == "cpu"  # results always come back to the CPU
        scale = float(x.scores.abs().max()) or 1.0
        torch.testing.assert_close(y.scores, x.scores, rtol=1e-3, atol=1e-3 * scale)


def test_a_model_split_between_gpu_and_cpu_equals_the_whole_model(models):
    cpu, _ = models
    size = sum(p.numel() * p.element_size() for p in cpu.model.parameters())
    split = tokattr.load_model(
        "arith-tiny", device_map="auto", max_memory={0: size // 2, "cpu": 4 * size}
    )
    assert split.split and {"cpu", 0} <= set(split.model.hf_device_map.values())
    for method in ("integrated_gradients", "saliency", "occlusion"):
        a = tokattr.attribute(cpu, PROMPTS, method, target=ANSWERS, **PARAMS.get(method, {}))
        b = tokattr.attribute(split, PROMPTS, method, target=ANSWERS, **PARAMS.get(method, {}))
        for x, y in zip(a, b, strict=True):
            scale = float(x.scores.abs().max()) or 1.0
            torch.testing.assert_close(y.scores, x.scores, rtol=1e-3, atol=1e-3 * scale)
