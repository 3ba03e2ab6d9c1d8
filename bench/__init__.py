"""tokattr's performance benchmark (pytest-benchmark), kept out of the test run.

Run it from the repository root (``testpaths`` is ``tests``, so a plain ``pytest`` never
collects it)::

    pytest bench/ --benchmark-only                        # quick scale on CPU, full on CUDA
    pytest bench/ --benchmark-only --bench-scale full     # the standard settings everywhere
    pytest bench/ --benchmark-only -k "arith and occlusion"
    bash scripts/bench.sh [pytest args]                   # set up the venv, then the above

What it measures, for every attribution method (``random`` excepted: it evaluates nothing):

- **tokattr**: ``tokattr.attribute(lm, prompts, method, target=answers, baseline="pad",
  seed=0, batch_size=...)`` on the whole prompt set, seconds per prompt (the fastest round).
  tokattr's defaults: occlusion reuses the unperturbed prefix's key/value states, Kernel SHAP,
  Shapley sampling and exact Shapley the states of an earlier coalition where that is
  estimated to pay. These four also run with ``prefix_reuse=False`` (implementation
  ``tokattr-full_sequences``), every perturbed sequence in full.
- **captum**: Captum's ``LLMAttribution`` (``FeatureAblation``, ``ShapleyValueSampling``,
  ``KernelShap``) in teacher-forced mode (``forward_in_tokens=False``) and
  ``LLMGradientAttribution`` (``LayerIntegratedGradients``, ``LayerGradientXActivation``),
  one prompt at a time as those classes require, on ``TextTokenInput(prompt, baselines=<pad
  id>, skip_tokens=[<bos id>])``. The answer is given as token ids, exactly the ones tokattr
  scores (encoding the answer string on its own would add a word-start marker).
- **inseq**: Inseq 0.7 (``integrated_gradients``, ``occlusion``, ``saliency``,
  ``input_x_gradient``) in a subprocess of its own virtual environment
  (``$TOKATTR_BENCH_INSEQ_PYTHON``, default ``.venv-inseq/bin/python``, built by
  ``bash scripts/inseq_env.sh``; skipped with a
  recorded reason when absent). Inseq attributes each answer token separately with its own
  baselines, so it is a *timing* peer only: its scores are never compared.
- **floor**: the compute floor of the method on the same padded token batch tokattr builds:
  (sequence evaluations the method needs) x (the per-sequence cost of a bare forward, or
  forward + backward w.r.t. ``inputs_embeds`` for gradient methods, at the best batch size),
  measured in the same session. Evaluations per prompt with ``n`` feature tokens: occlusion
  ``n + 1`` forwards; kernel_shap ``n_samples``; shapley_sampling ``1 + n_samples * n``;
  exact_shapley ``2 ** n``; integrated_gradients ``n_steps`` forward + backward and 2
  forwards; saliency and input_x_gradient 1 forward + backward.

Models and prompts: ``arith-tiny`` (the bundled model) on 32 problems of
``ArithmeticGenerator(seed=4242)``, and ``llama-100m``, a ``LlamaForCausalLM`` with seeded
random weights (~99M parameters) on prompts of exactly 16, 64 and 256 tokens (BOS included)
cut from arithmetic demonstrations. Where tokattr and Captum compute the same quantity
(occlusion, shapley_sampling and kernel_shap with the same torch seed, integrated gradients,
input x gradient) the scores are compared and the check is recorded (and asserted).

Memory: integrated gradients on one 1,024-token prompt with ``llama-100m``, in a fresh
subprocess per run (``bench/_memory_worker.py``), for two step-chunk sizes (``batch_size``)
and, when ``tokattr.attribute`` takes ``memory_budget``, with the budget; the peak (CUDA
``max_memory_allocated`` or the process's peak RSS above its RSS after loading the model) is
recorded against the budget.

Scale (``--bench-scale`` or ``$TOKATTR_BENCH_SCALE``): ``quick`` (default without CUDA)
keeps the bundled model at the standard settings and runs ``llama-100m`` on a few prompts with
fewer samples / steps at long lengths; peers whose estimated time exceeds the peer budget
(``--bench-peer-budget``, 120 s in quick mode) run on fewer prompts or are skipped. ``full``
(default on CUDA) runs the standard settings. Everything run or skipped, and why, is recorded.
Other options: ``--bench-dtype fp32|bf16``, ``--bench-name``, ``--bench-peers``,
``--bench-batch-size``, ``--bench-fresh``, ``--bench-memory-budget`` (see ``conftest.py``).

Outputs, in ``bench/results/``: ``<name>.json`` (machine, settings, floors, one row per
(model, prompt set, method, implementation), equality checks, memory runs, skips; rows of
earlier sessions with the same name, scale, device and dtype are kept unless re-run or
``--bench-fresh``), ``<name>.md`` (the table of ratios to the floor and speed-ups with a
target column) and ``<name>.png`` (ratio to the floor per method and implementation). The
table is printed at the end of the session. Speed targets are reported, never asserted.
"""
