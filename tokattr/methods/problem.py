"""What a method sees: embeddings, baselines, features and a target function. No tokenizer.

A method gets an :class:`AttributionProblem` (a batch of rows) and returns a
:class:`MethodOutput` with one score per column, exactly 0 off the features.

A *feature* is one token (the default) or a group of consecutive tokens (a word, a sentence,
a demonstration: :mod:`tokattr.features`), ``feature_ids``. Removing a feature replaces every
one of its tokens by the baseline; a feature's score is the sum of its columns' scores, so a
perturbation method puts a feature's value on its first column
(:meth:`AttributionProblem.scatter`) and a gradient method leaves its per-token scores, summed
over the feature afterwards (:meth:`AttributionProblem.reduce`).

Baselines equal the input embeddings everywhere except at feature columns, so "replace the
whole row by its baseline" only ever removes features: BOS, padding and the answer slot stay
as they are whatever a method perturbs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache

from tokattr.engine.cache import Prefix, cache_states
from tokattr.engine.memory import ModelShape
from tokattr.targets import TargetInputs, TokenForm

if TYPE_CHECKING:
    from tokattr.engine.packing import Branches

T = TypeVar("T")
OutOfMemory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
"""What a pass that does not fit raises (``torch.OutOfMemoryError`` from torch 2.5 on)."""


class Forward(Protocol):
    """The problem's target: ``(embeds [rows, seq, d_model], inputs for those rows) -> scores
    [rows]``. Where the problem has ``prefix_ok``, ``past=Prefix(cache, offset)`` reads the
    columns before ``offset`` from a key/value cache (:class:`tokattr.engine.cache.Prefix`)
    instead of recomputing them; where it has ``branches_ok``, ``branches=Branches(...)`` adds
    copies of rows that differ from a column on, packed with their rows into one pass, and the
    result is ``[rows + branches]`` (:class:`tokattr.engine.packing.Branches`)."""

    def __call__(
        self,
        embeds: Tensor,
        inputs: TargetInputs,
        past: Prefix | None = None,
        branches: Branches | None = None,
    ) -> Tensor: ...


BATCHED_BACKWARD = True
"""Whether an example's answer-token rows get their gradients from one batched (vmapped)
backward pass per chunk of ranks (``torch.autograd.grad(..., is_grads_batched=True)``) or one
backward pass per rank."""


@dataclass(frozen=True)
class AttributionProblem:
    """A batch of rows to attribute.

    ``batch_size`` is the most sequences a method may put through the model in one forward
    pass (a packed pass, :class:`~tokattr.engine.packing.Branches`, holds the memory of that many
    full sequences) (``grad_batch_size``, when given, the most in one forward + backward pass).
    ``seeds`` seeds each row's random draws on its own (``None``: the global RNG), so a
    row's scores do not depend on which other rows share its batch. ``prefix_ok``: ``forward``
    takes ``past=`` (a key/value cache of the unchanged leading columns), so perturbation
    methods may skip recomputing them. ``branches_ok``: ``forward`` takes ``branches=`` (the
    model honours a packed tree's attention mask and position ids). ``shape``: the model's
    dimensions, where a method sizes passes of unlike sequences by memory
    (:mod:`tokattr.engine.memory`). ``model``: the language model itself, for the methods that
    read its attention or rewrite its backward pass (:mod:`tokattr.methods.internals`); the
    others see it only through ``forward``. ``count(rows)``: such a method reports each pass it
    makes on the model directly (``rows`` the inputs of the sequences in it), so
    ``model_evals`` counts them like the passes through ``forward``. ``states_budget``: the
    bytes of key/value states the prefix-sharing passes may hold at once
    (:func:`tokattr.engine.memory.states_budget`; ``None``:
    :data:`~tokattr.engine.memory.STATES_BUDGET`).
    """

    forward: Forward
    embeds: Tensor  # [batch, seq, d_model]
    baselines: Tensor  # [batch, seq, d_model], equal to embeds off the features
    feature_mask: Tensor  # [batch, seq] bool
    inputs: TargetInputs  # [batch, ...]
    batch_size: int
    seeds: tuple[int | None, ...]
    grad_batch_size: int | None = None
    prefix_ok: bool = False
    branches_ok: bool = False
    shape: ModelShape | None = None
    feature_ids: Tensor | None = None  # [batch, seq] long: feature of each column, -1 off them
    log_prob_target: bool = False  # the target is the answer's log-probability (targets.log_prob)
    model: torch.nn.Module | None = None  # the causal LM, for methods that read its internals
    count: Callable[[TargetInputs], None] | None = None  # records passes made outside forward
    token_form: TokenForm | None = None  # the target per token: rows of one input share passes
    states_budget: int | None = None  # bytes of key/value states held at once (None: default)

    @property
    def grouped(self) -> bool:
        """Whether features are groups of tokens (``feature_ids`` given), not single tokens."""
        return self.feature_ids is not None

    @functools.cached_property
    def column_feature(self) -> Tensor:
        """The feature each column belongs to (its slot, 0 to ``n - 1`` in column order), -1
        off the features. ``[batch, seq]`` long"""
        if self.feature_ids is not None:
            return self.feature_ids.to(self.feature_mask.device)
        mask = self.feature_mask
        return torch.where(
            mask, mask.long().cumsum(-1) - 1, torch.full_like(mask, -1, dtype=torch.long)
        )

    @functools.cached_property
    def lead_mask(self) -> Tensor:
        """The first column of every feature: where a feature's value sits in a
        ``[batch, seq]`` score tensor (every feature column for single-token features).
        ``[batch, seq]`` bool"""
        if self.feature_ids is None:
            return self.feature_mask
        fid = self.column_feature
        # Ids grow with the column; a feature's later columns (even after a special token
        # inside it) hold an id already seen.
        seen = torch.cat([torch.full_like(fid[:, :1], -1), fid[:, :-1]], dim=1).cummax(-1).values
        return fid > seen

    @property
    def grad_batch(self) -> int:
        """The most sequences in one forward + backward pass."""
        return self.grad_batch_size or self.batch_size

    @property
    def shared_grad_batch(self) -> int:
        """Points per forward + backward chunk where rows share inputs (``token_form``: an
        example's answer-token rows): ``grad_batch`` inputs, each counted once, so a chunk
        holds every sibling of a point (:meth:`value_and_grad`)."""
        if self.token_form is None:
            return self.grad_batch
        return self.grad_batch * int(torch.bincount(self.inputs.example_index).max())

    @property
    def n_rows(self) -> int:
        return self.embeds.shape[0]

    @functools.cached_property
    def left_pad(self) -> Tensor:
        """Left-padding columns of each row (its first attended column). [batch]"""
        return self.inputs.attention_mask.long().argmax(-1)

    @functools.cached_property
    def right_end(self) -> Tensor:
        """One past each row's last attended column (of the answer or of the foil). [batch]"""
        mask = self.inputs.attention_mask.bool()
        if self.inputs.foil_attention_mask is not None:
            mask = mask | self.inputs.foil_attention_mask.bool()
        cols = torch.arange(mask.shape[1], device=mask.device)
        return torch.where(mask, cols, -1).max(-1).values + 1

    def trim(self, rows: Tensor) -> slice:
        """The columns any of ``rows`` attends to: the columns outside are padding in all of
        them (left padding of the prompts, right padding of the answers), so a pass over those
        rows may leave them out."""
        return slice(int(self.left_pad[rows].min()), int(self.right_end[rows].max()))

    def by_length(self, rows: Tensor) -> Tensor:
        """An order of ``rows`` (positions in it) that puts rows of like length together, so
        chunks in that order carry little padding."""
        return torch.argsort(self.left_pad[rows], descending=True, stable=True)

    @property
    def n_features(self) -> Tensor:
        """Features per row. [batch]"""
        return self.lead_mask.sum(-1)

    def select(self, rows: Tensor) -> AttributionProblem:
        """The rows ``rows`` (an index tensor ``[n]``) as a problem of their own (every other
        field as it is)."""
        rows = rows.to(self.embeds.device)
        return dataclasses.replace(
            self,
            embeds=self.embeds[rows],
            baselines=self.baselines[rows],
            feature_mask=self.feature_mask[rows],
            inputs=self.inputs.select(rows),
            seeds=tuple(self.seeds[int(r)] for r in rows),
            feature_ids=None if self.feature_ids is None else self.feature_ids[rows],
        )

    def feature_columns(self) -> Tensor:
        """First column of each row's k-th feature (its only one for single-token features);
        slots past a row's last feature hold a column that is not a feature (where removing
        is a no-op). [batch, n_max]"""
        return _ranked_columns(self.lead_mask, self.feature_mask, int(self.n_features.max()))

    def token_columns(self) -> tuple[Tensor, Tensor]:
        """Every feature column of each row in order (the columns of all its features), padded
        with a non-feature column, and how many each row has. ``[batch, t_max]``, ``[batch]``"""
        n = self.feature_mask.sum(-1)
        return _ranked_columns(self.feature_mask, self.feature_mask, int(n.max())), n

    def scatter(self, values: Tensor) -> Tensor:
        """Per-feature values ``[batch, n_max]`` -> per-column scores ``[batch, seq]``: each
        value on its feature's first column, 0 elsewhere (float32), so summing a feature's
        columns (:meth:`reduce`) gives it back."""
        out = torch.zeros(self.feature_mask.shape, dtype=torch.float32, device=values.device)
        n = self.n_features.to(values.device)
        valid = torch.arange(values.shape[1], device=values.device)[None] < n[:, None]
        cols = self.feature_columns().to(values.device)
        for b in range(out.shape[0]):
            out[b, cols[b, valid[b]]] = values[b, valid[b]].float()
        return out

    def reduce(self, scores: Tensor) -> Tensor:
        """Per-column scores ``[batch, seq]`` -> per-feature scores ``[batch, n_max]``: the
        sum over each feature's columns (0 past a row's features; float32). Exactly the
        feature's column for single-token features."""
        fid = self.column_feature.to(scores.device)
        n_max = int(self.n_features.max())
        if not self.grouped:
            cols = self.feature_columns().to(scores.device)
            valid = torch.arange(n_max, device=scores.device)[None] < self.n_features[:, None].to(
                scores.device
            )
            return torch.where(valid, scores.float().gather(1, cols), 0.0)
        out = torch.zeros(scores.shape[0], n_max + 1, dtype=torch.float32, device=scores.device)
        sink = torch.where(fid >= 0, fid, n_max)
        out.scatter_add_(1, sink, scores.float())
        return out[:, :n_max]

    def keep_columns(self, rows: Tensor, keep: Tensor) -> Tensor:
        """Per-feature keep flags ``[n, k]`` of rows ``rows`` -> per-column ``[n, seq]`` bool
        (True off the features and for slots past ``k``)."""
        fid = self.column_feature[rows]  # [n, seq]
        width = keep.shape[1]
        inside = (fid >= 0) & (fid < width)
        return torch.where(inside, keep.gather(1, fid.clamp(0, width - 1)), True)

    def scale_columns(self, rows: Tensor, alpha: Tensor) -> Tensor:
        """Per-feature scales ``[n, k]`` of rows ``rows`` -> per-column ``[n, seq]`` (1 off the
        features and for slots past ``k``)."""
        fid = self.column_feature[rows]  # [n, seq]
        width = alpha.shape[1]
        inside = (fid >= 0) & (fid < width)
        return torch.where(inside, alpha.gather(1, fid.clamp(0, width - 1)), 1.0).to(alpha.dtype)

    @torch.no_grad()
    def evaluate(
        self,
        rows: Tensor,
        keep: Tensor,
        parents: Tensor | None = None,
        share_prefixes: bool = False,
    ) -> Tensor:
        """The target on rows with some features removed, ``batch_size`` sequences per forward.
        Each distinct perturbation of a row runs once (coalition samplers draw many repeats:
        the whole prompt ends every Shapley-sampling permutation, and Kernel SHAP's few likely
        coalition sizes on a short prompt have few members), so a row may put fewer sequences
        through the model than it has perturbations.

        With ``share_prefixes`` (and a target that takes key/value prefixes, ``prefix_ok``),
        each perturbation re-runs only from its first column that differs from its row, from
        its row with every feature removed, or from its ``parents`` entry, whichever agrees
        longest, over that sequence's key/value states
        (:func:`tokattr.engine.coalitions.evaluate_sharing_prefixes`); the scores are the
        same to float rounding.

        Args:
            rows: ``[n]`` which row each perturbation belongs to.
            keep: ``[n, k]`` bool, whether the row's j-th feature is kept (``k <= n_max``;
                slots past a row's features are ignored).
            parents: ``[n]`` an earlier perturbation of the same row that each is likely to
                agree with over many leading columns (index into ``rows``), or -1.
            share_prefixes: compute leading columns shared with another sequence once.

        Returns:
            ``[n]`` target scores.
        """
        device = self.embeds.device
        rows = rows.to(device)
        keep = keep.to(device).bool()
        width = keep.shape[1]
        slots = torch.arange(width, device=device)[None]  # [1, k]
        # Slots past a row's features point at a non-feature column: always "keep" there.
        keep = keep | (slots >= self.n_features[rows, None])  # [n, k]
        distinct, repeat = torch.unique(
            torch.cat([rows[:, None], keep.long()], dim=1), dim=0, return_inverse=True
        )  # [m, 1 + k], [n]
        rows, keep = distinct[:, 0], distinct[:, 1:].bool()
        if share_prefixes and self.prefix_ok:
            from tokattr.engine.coalitions import evaluate_sharing_prefixes

            own = torch.full((len(rows),), -1, dtype=torch.long, device=device)
            if parents is not None:
                parents = parents.to(device)
                named = (parents >= 0).nonzero().squeeze(-1)
                own[repeat[named]] = repeat[parents[named]]
                own = torch.where(own == torch.arange(len(rows), device=device), -1, own)
            out = evaluate_sharing_prefixes(self, rows, self.keep_columns(rows, keep), own)
            if out is not None:
                return out[repeat]

        order = self.by_length(rows)
        rows, keep = rows[order], keep[order]

        def run(i: int, j: int) -> Tensor:
            r = rows[i:j]  # [chunk]
            k = keep[i:j]  # [chunk, k]
            col_keep = self.keep_columns(r, k)  # [chunk, seq]
            cols = self.trim(r)
            x = torch.where(col_keep[:, cols, None], self.embeds[r, cols], self.baselines[r, cols])
            with torch.inference_mode():  # faster; the result is copied out of it below
                return self.forward(x, self.inputs.select(r, cols))

        out = torch.cat(chunked(rows.shape[0], self.batch_size, run))  # [m] in length order
        return torch.empty_like(out).index_copy_(0, order, out)[repeat]

    @torch.no_grad()
    def interpolate(self, rows: Tensor, alpha: Tensor) -> Tensor:
        """The target with each feature's embedding moved along its baseline-to-input segment:
        ``baseline + alpha * (input - baseline)`` (``alpha`` 1 keeps the feature, 0 removes it;
        any real value is allowed). Non-feature columns stay as they are.

        Args:
            rows: ``[n]`` which row each point belongs to.
            alpha: ``[n, k]`` float, the scale of the row's j-th feature (``k <= n_max``; slots
                past a row's features are ignored).

        Returns:
            ``[n]`` target scores.
        """
        device = self.embeds.device
        rows = rows.to(device)
        alpha = alpha.to(device=device, dtype=self.embeds.dtype)
        width = alpha.shape[1]
        slots = torch.arange(width, device=device)[None]  # [1, k]

        order = self.by_length(rows)
        rows, alpha = rows[order], alpha[order]

        def run(i: int, j: int) -> Tensor:
            r = rows[i:j]  # [chunk]
            a = alpha[i:j]  # [chunk, k]
            a = torch.where(slots < self.n_features[r, None], a, torch.ones_like(a))
            col_alpha = self.scale_columns(r, a)  # [chunk, seq]
            cols = self.trim(r)
            base, x_in = self.baselines[r, cols], self.embeds[r, cols]  # [chunk, seq', d_model]
            x = base + col_alpha[:, cols, None] * (x_in - base)
            # Off the features the baseline equals the input, so x is the input there exactly.
            x = torch.where(self.feature_mask[r, cols, None], x, x_in)
            with torch.inference_mode():  # faster; the result is copied out of it below
                return self.forward(x, self.inputs.select(r, cols))

        out = torch.cat(chunked(rows.shape[0], self.batch_size, run))  # [n] in length order
        return torch.empty_like(out).index_copy_(0, order, out)

    @torch.no_grad()
    def evaluate_soft(
        self, rows: Tensor, keep_prob: Tensor, uniforms: Callable[[int], Tensor]
    ) -> Tensor:
        """The target with each feature token's embedding kept element by element: element
        ``e`` of a token of feature ``j`` keeps the input's value where ``u_e < keep_prob[j]``
        and takes the baseline's otherwise (Zhao & Aletras's soft removal, with the problem's
        baseline in place of their zero vector). Non-feature columns stay as they are.

        Args:
            rows: ``[n]`` which row each perturbation belongs to.
            keep_prob: ``[n, k]`` the keep probability of the row's j-th feature.
            uniforms: ``i -> [t, d_model]`` the draws ``u`` of perturbation ``i`` (one row per
                feature token of its row, in column order; :meth:`token_columns`), so that a
                perturbation does not depend on the batch it is computed in.

        Returns:
            ``[n]`` target scores.
        """
        device = self.embeds.device
        rows = rows.to(device)
        keep_prob = keep_prob.to(device=device, dtype=torch.float32)
        token_cols, n_tokens = self.token_columns()
        order = self.by_length(rows)

        def run(i: int, j: int) -> Tensor:
            idx = order[i:j]
            r = rows[idx]  # [chunk]
            cols = self.trim(r)
            col_q = self.scale_columns(r, keep_prob[idx])  # [chunk, seq], 1 off the features
            u = torch.zeros(len(r), self.embeds.shape[1], self.embeds.shape[2], device=device)
            for c, (row, pert) in enumerate(zip(r.tolist(), idx.tolist(), strict=True)):
                t = int(n_tokens[row])
                u[c, token_cols[row, :t].to(device)] = uniforms(pert).to(device)
            keep = u[:, cols] < col_q[:, cols, None]
            x = torch.where(keep, self.embeds[r, cols], self.baselines[r, cols])
            with torch.inference_mode():  # faster; the result is copied out of it below
                return self.forward(x, self.inputs.select(r, cols))

        out = torch.cat(chunked(rows.shape[0], self.batch_size, run))  # [n] in length order
        return torch.empty_like(out).index_copy_(0, order, out)

    def value_and_grad(self, x: Tensor, rows: Tensor, cols: slice) -> tuple[Tensor, Tensor]:
        """The target at ``x`` ``[n, len(cols), d_model]`` (inputs of ``rows`` on ``cols``)
        and its gradient with respect to ``x``. ``[n]`` (detached), ``[n, len(cols), d_model]``.

        Rows with the same example and the same ``x`` that score different answer tokens (the
        rows of ``per_answer_token``) share one forward pass, through the target's per-token
        form (:class:`~tokattr.targets.TokenForm`), and a backward pass per rank among them,
        each over all the shared inputs at once, the ranks batched into one vmapped backward
        pass where the pass has room (:data:`BATCHED_BACKWARD`): the source x answer-token
        matrix of ``k`` answer tokens costs one forward pass of one row and the work of ``k``
        backward passes, instead of ``k`` of each.
        """
        inputs = self.inputs.select(rows, cols)
        shared = self._shared_inputs(x, inputs) if self.token_form is not None else None
        if shared is None:
            with torch.enable_grad():
                x = x.detach().requires_grad_()
                f = self.forward(x, inputs)
                (g,) = torch.autograd.grad(f.sum(), x)
            return f.detach(), g
        first, group, rank = shared  # [u] rows that run, [n] their group, [n] rank in it
        mask = inputs.score_mask.long()
        union = torch.zeros_like(mask[first]).index_add_(0, group, mask) > 0  # [u, cols]
        run = dataclasses.replace(inputs.select(first), score_mask=union)
        form, model = self.token_form, self.model
        assert form is not None and model is not None
        grad = torch.empty_like(x)
        with torch.enable_grad():
            xu = x[first].detach().requires_grad_()
            values = form.columns(model, xu, run)  # [u, k]
            k = values.shape[1]
            f = form.combine(values[group], inputs.score_mask[:, -k:])  # [n]
            ranks = int(rank.max()) + 1
            # Cotangent t selects the t-th row of every group: one batched backward pass for
            # a chunk of them (vmapped, ``is_grads_batched``), sized so its gradients take no
            # more room than a pass of ``grad_batch`` sequences.
            chunk = max(1, min(ranks, self.grad_batch // max(1, len(first))))
            chunk = -(-ranks // -(-ranks // chunk))  # chunks of even size
            pick = torch.zeros(ranks, len(f), dtype=f.dtype, device=f.device)
            pick[rank, torch.arange(len(f), device=f.device)] = 1.0
            for t0 in range(0, ranks, chunk):
                t1 = min(ranks, t0 + chunk)
                last = t1 == ranks
                if BATCHED_BACKWARD and t1 - t0 > 1:
                    (gu,) = torch.autograd.grad(
                        f, xu, pick[t0:t1], retain_graph=not last, is_grads_batched=True
                    )  # [t1 - t0, u, cols, d]
                else:
                    gu = torch.stack(
                        [
                            torch.autograd.grad(f, xu, pick[t], retain_graph=t < ranks - 1)[0]
                            for t in range(t0, t1)
                        ]
                    )
                mine = ((rank >= t0) & (rank < t1)).nonzero().flatten()
                grad[mine] = gu[rank[mine] - t0, group[mine]]
        if self.count is not None:
            self.count(run)
        return f.detach(), grad

    @staticmethod
    def _shared_inputs(x: Tensor, inputs: TargetInputs) -> tuple[Tensor, Tensor, Tensor] | None:
        """Groups of rows with one example and one input ``x`` (in order of first row):
        ``(first row of each group [u], group of each row [n], rank of each row in its group
        [n])``; ``None`` when no two rows share."""
        examples = inputs.example_index.tolist()
        first: list[int] = []
        group, rank = [], []
        seen: dict[int, list[int]] = {}  # example -> its groups
        sizes: list[int] = []
        for i, e in enumerate(examples):
            for g in seen.get(e, []):
                j = first[g]
                if torch.equal(x[i], x[j]) and torch.equal(
                    inputs.attention_mask[i], inputs.attention_mask[j]
                ):
                    group.append(g)
                    rank.append(sizes[g])
                    sizes[g] += 1
                    break
            else:
                seen.setdefault(e, []).append(len(first))
                group.append(len(first))
                rank.append(0)
                first.append(i)
                sizes.append(1)
        if len(first) == len(examples):
            return None
        device = x.device
        return (
            torch.tensor(first, device=device),
            torch.tensor(group, device=device),
            torch.tensor(rank, device=device),
        )

    def gradients(self) -> tuple[Tensor, Tensor]:
        """The target on the unperturbed rows and its gradient with respect to their input
        embeddings, ``grad_batch`` rows per forward + backward pass. ``[batch]``,
        ``[batch, seq, d_model]``."""
        rows = torch.arange(self.n_rows, device=self.embeds.device)
        rows = rows[self.by_length(rows)]
        grad = torch.zeros_like(self.embeds)

        def run(i: int, j: int) -> Tensor:
            r = rows[i:j]
            cols = self.trim(r)
            f, g = self.value_and_grad(self.embeds[r, cols], r, cols)
            grad[r, cols] = g
            return f

        f = torch.cat(chunked(self.n_rows, self.shared_grad_batch, run))  # [batch], length order
        return torch.empty_like(f).index_copy_(0, rows, f), grad

    @torch.inference_mode()
    def states(self) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """The target on the unperturbed rows and, per layer, their key/value states (for
        :class:`~tokattr.engine.cache.Prefix`); needs ``prefix_ok``. ``[batch]``, per layer
        ``([batch, heads, seq, head_dim], ...)``: inference tensors (``torch.inference_mode``),
        not to be changed in place or used with autograd."""
        if not self.prefix_ok:
            raise ValueError("this problem's target function does not take a key/value prefix")
        rows = torch.arange(self.n_rows, device=self.embeds.device)

        def run(i: int, j: int) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
            cache = DynamicCache()
            r = rows[i:j]
            fx = self.forward(self.embeds[r], self.inputs.select(r), past=Prefix(cache, 0))
            return fx, cache_states(cache)

        parts = chunked(self.n_rows, self.batch_size, run)
        fx = torch.cat([p[0] for p in parts])
        layers = [
            (torch.cat([p[1][i][0] for p in parts]), torch.cat([p[1][i][1] for p in parts]))
            for i in range(len(parts[0][1]))
        ]
        return fx, layers

    def mask_forward(self, row: int) -> Callable[[Tensor], Tensor]:
        """``keep [n, n_features(row)] (0/1 floats) -> f [n]`` for one row: the function that
        Captum's perturbation methods see when they work on a row's token mask."""

        def forward(keep: Tensor) -> Tensor:
            rows = torch.full((keep.shape[0],), row, dtype=torch.long)
            return self.evaluate(rows, keep > 0.5)

        return forward


def _ranked_columns(mask: Tensor, feature_mask: Tensor, width: int) -> Tensor:
    """The columns where ``mask`` holds, in order, ``width`` per row; slots past a row's count
    hold its first column off ``feature_mask``. ``[batch, width]``"""
    cols = torch.arange(mask.shape[1], device=mask.device)
    # The marked columns first (in column order), then the rest: a stable sort.
    order = torch.sort((~mask).long(), dim=-1, stable=True).indices
    ranked = cols[order]  # [batch, seq]
    first_free = (~feature_mask).long().argmax(-1, keepdim=True)  # [batch, 1]
    k = torch.arange(width, device=cols.device)[None]  # [1, width]
    valid = k < mask.sum(-1, keepdim=True)  # [batch, width]
    return torch.where(valid, ranked[:, :width], first_free)  # [batch, width]


@dataclass(frozen=True)
class MethodOutput:
    """Scores per column (0 off the features), and what the method reports besides."""

    scores: Tensor  # [batch, seq] float32
    delta: Tensor | None = None  # [batch] IG convergence delta, where the method has one
    fx: Tensor | None = None  # [batch] the target on the unperturbed rows, where computed


class Method(Protocol):
    """An attribution method: hyper-parameters in ``__init__``, one verb. Every method in
    :data:`tokattr.methods.METHODS` subclasses it, inheriting the capability defaults below
    (a method overrides those it has, as a class attribute or a property).

    Attributes:
        packs_branches: the method may call ``forward(..., branches=...)`` (packed tree
            passes); the engine then probes, once per model, whether the model scores them
            exactly, and sets the problem's ``branches_ok``.
        gives_exact_shapley: the method's scores are the exact Shapley values, so the
            ``shapley_error`` metric may take them as its reference instead of enumerating
            the coalitions again.
    """

    packs_branches: bool = False
    gives_exact_shapley: bool = False

    def attribute(self, problem: AttributionProblem) -> MethodOutput: ...


def chunked(n: int, size: int, run: Callable[[int, int], T]) -> list[T]:
    """``[run(0, size), run(size, 2 size), ...]`` over ``n`` items; a chunk that runs out of
    accelerator memory is retried at half the size (down to one item) instead of failing, and
    the smaller size is kept for the chunks after it."""
    out: list[T] = []
    i, warned = 0, False
    while i < n:
        j = min(i + size, n)
        try:
            out.append(run(i, j))
        except OutOfMemory:
            if j - i == 1:
                raise
            size = max(1, (j - i) // 2)
            if not warned:
                warnings.warn(
                    f"out of memory with {j - i} sequences per pass; retrying with {size} "
                    "(and halving again where needed)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                warned = True
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        i = j
    return out


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the block with the CPU RNG seeded by ``seed`` and restore the RNG after it
    (``None``: use and advance the global RNG). Captum draws its samples on the CPU."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
