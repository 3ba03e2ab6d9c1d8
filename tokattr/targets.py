"""Target functions: the one seam between a model and an attribution method.

A target function maps input embeddings ``[batch, seq, d_model]`` (plus fixed masks,
positions and answer ids, :class:`TargetInputs`) to one score per row ``[batch]``. Methods
only ever call such a function; tokenizers and generation stay on the other side.

All targets are teacher-forced: one forward pass over ``prompt + answer`` scores every answer
token given the prompt and the earlier answer tokens. Log-softmax is taken in float32 whatever
the model's dtype.

- :func:`log_prob` (default): ``sum_t log p(answer_t | prompt, answer_<t)``.
- :func:`prob`: ``exp`` of that, the probability of the whole answer.
- :func:`logit`: the raw logit of the first scored answer token.
- :func:`contrast`: ``log p(answer) - log p(foil)``, a second forward pass with the foil.

Which answer tokens count is ``TargetInputs.score_mask``: all of them by default, one per row
in per-answer-token mode (then :func:`logit` is that token's logit).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache

from tokattr.batching import TokenBatch


@dataclass(frozen=True)
class TargetInputs:
    """Everything a target function reads besides the embeddings, one row per sequence.

    Column ``j`` of ``labels`` is the token at column ``j``; an answer token at column ``j`` is
    scored from the logits at ``j - 1``.
    """

    attention_mask: Tensor  # [batch, seq]
    position_ids: Tensor  # [batch, seq]
    labels: Tensor  # [batch, seq] token ids (prompt + answer)
    score_mask: Tensor  # [batch, seq] bool, answer tokens that count
    slot_mask: Tensor  # [batch, seq] bool, the continuation slot (answer or foil columns)
    example_index: Tensor  # [batch] which example each row belongs to (for counting)
    foil_labels: Tensor | None = None  # [batch, seq] prompt + foil ids
    foil_attention_mask: Tensor | None = None  # [batch, seq]
    foil_score_mask: Tensor | None = None  # [batch, seq] bool
    foil_position_ids: Tensor | None = None  # [batch, seq] positions of prompt + foil

    def as_tuple(self) -> tuple[Tensor | None, ...]:
        """The fields in order, e.g. as Captum's ``additional_forward_args`` (which it expands
        along the batch dimension for steps and perturbations)."""
        return tuple(getattr(self, f.name) for f in fields(self))

    def select(self, rows: Tensor, cols: slice | None = None) -> TargetInputs:
        """The rows ``rows`` (an index tensor ``[n]``), in that order; only the columns ``cols``
        where given (the columns left out must be padding in all of those rows)."""
        if cols is None:
            return TargetInputs(*(None if t is None else t[rows] for t in self.as_tuple()))
        return TargetInputs(
            *(
                None if t is None else t[rows] if t.dim() == 1 else t[rows, cols]
                for t in self.as_tuple()
            )
        )


def target_inputs(batch: TokenBatch, per_answer_token: bool = False) -> TargetInputs:
    """The target inputs of a token batch: one row per example scoring its whole answer, or
    (``per_answer_token``) one row per answer token scoring that token alone, examples in
    order. ``example_index`` maps rows to examples."""
    n_examples, seq = batch.input_ids.shape
    device = batch.input_ids.device
    if per_answer_token:
        rows, cols = batch.answer_mask.nonzero(as_tuple=True)  # row-major: examples in order
        score = torch.zeros(len(rows), seq, dtype=torch.bool, device=device)  # [rows, seq]
        score[torch.arange(len(rows), device=device), cols] = True
    else:
        rows = torch.arange(n_examples, device=device)
        score = batch.answer_mask
    slot = torch.arange(seq, device=device) >= batch.prompt_width  # [seq]

    def pick(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[rows]

    return TargetInputs(
        attention_mask=batch.attention_mask[rows],
        position_ids=batch.position_ids[rows],
        labels=batch.input_ids[rows],
        score_mask=score,
        slot_mask=slot[None].expand(len(rows), seq),
        example_index=rows,
        foil_labels=pick(batch.foil_ids),
        foil_attention_mask=pick(batch.foil_attention_mask),
        foil_score_mask=pick(batch.foil_mask),
        foil_position_ids=pick(batch.foil_position_ids),
    )


TargetFunction = Callable[[nn.Module, Tensor, TargetInputs], Tensor]
"""``(model, embeds [batch, seq, d_model], inputs) -> scores [batch]``."""


@dataclass(frozen=True)
class Prefix:
    """Key/value states of the first ``offset`` columns, already computed: a target called with
    ``past=Prefix(cache, offset)`` runs the model on columns ``offset ..`` only (the earlier
    columns of ``embeds`` must be the ones the cache was computed from). The call appends the
    new columns' states to ``cache``, so ``Prefix(DynamicCache(), 0)`` fills an empty cache
    with the whole sequence's states."""

    cache: Cache
    offset: int


@dataclass(frozen=True)
class Branches:
    """Copies of some rows that differ from their row from a column on, scored in the same
    forward pass as the rows: a target called with ``branches=`` returns the rows' scores, then
    the branches' (``[batch + n]``).

    Each row and its branches are packed into one sequence whose attention mask lets a branch
    token see its own earlier tokens and its row's tokens before the branch point, with each
    token at its own position id (tree attention: Miao et al., "SpecInfer", ASPLOS 2024; Cai
    et al., "Medusa", ICML 2024). The columns a branch shares with its row are computed once;
    so is the row's last column, whose logits score nothing, never. Packed sequences are laid
    out as ``[prefix tokens of every sequence, padding, scored tokens of every sequence]`` so
    one ``logits_to_keep`` covers the scored tokens of all of them; short trees share a packed
    sequence (``packing``, by default :func:`first_fit_trees`).

    ``passes``: the packed sequences go through the model that many at a time (in the order
    of their ``packing`` ids), each forward pass as wide as its own sequences; all of them are
    laid out (and scored) at once, so a call's fixed cost is paid once, not once per pass.
    """

    rows: Tensor  # [n] the row (of the call's embeds) each branch copies
    start: Tensor  # [n] first column where it differs; at most the row's first scored column - 1
    # [n, seq, d_model] the branch's embeddings (columns before start not read), or [n, d_model]:
    # the branch is its row with only column ``start`` replaced by this vector.
    embeds: Tensor
    packing: Tensor | None = None  # [batch] packed sequence of each row (None: first_fit_trees)
    passes: int | None = None  # packed sequences per forward pass (None: all in one)


def tree_sizes(inputs: TargetInputs, start: Tensor, branch_rows: Tensor) -> tuple[Tensor, Tensor]:
    """Tokens of each row's packed tree (the row plus its branches, :class:`Branches`), and how
    many of them are scored, where ``branch_rows``/``start`` ``[n]`` are the branches' rows
    and first changed columns. ``[batch]`` each"""
    first, last = _scored_span(inputs.score_mask)
    left = inputs.attention_mask.long().argmax(-1)
    size = (last - left).index_add(0, branch_rows, last[branch_rows] - start)
    segments = torch.ones_like(size).index_add(0, branch_rows, torch.ones_like(start))
    return size, segments * (last - first + 1)


def _scored_span(score_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's first and last scored column. ``[batch]`` each"""
    if not score_mask.any(-1).all():
        raise ValueError("no answer token to score")
    cols = torch.arange(score_mask.shape[1], device=score_mask.device)
    first = torch.where(score_mask, cols, score_mask.shape[1]).min(-1).values
    last = torch.where(score_mask, cols, -1).max(-1).values
    return first, last


def first_fit_trees(sizes: list[int], width: int | None = None) -> list[int]:
    """First-fit decreasing (Johnson, "Near-optimal bin packing algorithms", MIT 1973): the
    packed sequence of each tree of ``sizes`` tokens, sequences of ``width`` tokens (default:
    the largest tree's)."""
    capacity = max(sizes) if width is None else width
    if max(sizes) > capacity:
        raise ValueError(f"a tree of {max(sizes)} tokens does not fit in {capacity}")
    room: list[int] = []
    bin_of = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        b = next((b for b, r in enumerate(room) if r >= sizes[i]), len(room))
        if b == len(room):
            room.append(capacity)
        room[b] -= sizes[i]
        bin_of[i] = b
    return bin_of


def _packed_score_columns(
    model: nn.Module,
    embeds: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    labels: Tensor,
    score_mask: Tensor,
    branches: Branches,
) -> tuple[Tensor, Tensor]:
    """:func:`_score_columns` for the rows and their branches in one packed pass (see
    :class:`Branches`). ``[batch + n, k]`` each, ``k`` = columns from the first scored one on."""
    device = embeds.device
    n_rows, seq = labels.shape
    first, last = _scored_span(score_mask)  # [batch] each
    k = seq - int(first.min())
    left = attention_mask.long().argmax(-1)  # [batch] first attended column
    b_rows = branches.rows.to(device)
    b_start = branches.start.to(device)
    if ((b_start >= first[b_rows]) | (b_start < left[b_rows])).any():
        raise ValueError("a branch must start in its row's prompt, before the first scored column")
    # Segments: the rows, then the branches. A segment runs its columns start .. last - 1.
    seg_row = torch.cat([torch.arange(n_rows, device=device), b_rows])  # [S]
    seg_start = torch.cat([left, b_start])  # [S]
    seg_len = last[seg_row] - seg_start  # [S]
    n_seg = len(seg_row)
    # Bin-pack the trees (a row with its branches) into packed sequences.
    tree_size = torch.zeros(n_rows, dtype=torch.long, device=device).index_add_(0, seg_row, seg_len)
    if branches.packing is None:
        bin_of_row = torch.tensor(first_fit_trees(tree_size.tolist()), device=device)
    else:
        bin_of_row = torch.unique(branches.packing.to(device), return_inverse=True)[1]
    n_bins = int(bin_of_row.max()) + 1
    # Tokens, segment by segment.
    tok_seg = torch.repeat_interleave(torch.arange(n_seg, device=device), seg_len)  # [N]
    seg_first_tok = torch.cumsum(seg_len, 0) - seg_len
    within = torch.arange(len(tok_seg), device=device) - seg_first_tok[tok_seg]
    tok_col = seg_start[tok_seg] + within
    tok_row = seg_row[tok_seg]
    tok_tail = tok_col >= first[tok_row] - 1  # its logits score a token
    # Place tokens: in each packed sequence, prefix tokens from the left, scored ones at the end
    # of the sequences of its pass (a pass is as wide as its fullest sequence).
    group = bin_of_row[tok_row] * 2 + tok_tail.long()  # [N]
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=2 * n_bins)  # [2 * bins]
    body_n, tail_n = counts[0::2], counts[1::2]
    per_pass = n_bins if branches.passes is None else max(1, int(branches.passes))
    n_passes = -(-n_bins // per_pass)
    pass_of_bin = torch.arange(n_bins, device=device) // per_pass
    pass_width = torch.zeros(n_passes, dtype=torch.long, device=device)
    pass_width.scatter_reduce_(0, pass_of_bin, body_n + tail_n, "amax")
    pass_keep = torch.zeros_like(pass_width).scatter_reduce_(0, pass_of_bin, tail_n, "amax")
    rank = torch.empty_like(order)
    rank[order] = (
        torch.arange(len(order), device=device) - (torch.cumsum(counts, 0) - counts)[group[order]]
    )
    tok_bin = bin_of_row[tok_row]
    bin_width = pass_width[pass_of_bin]  # [bins]
    pos = torch.where(tok_tail, bin_width[tok_bin] - tail_n[tok_bin] + rank, rank)  # [N]
    widths, keeps = pass_width.tolist(), pass_keep.tolist()
    width = max(widths)
    # Packed inputs. Tokens go segment by segment, rows first: the rows' tokens come first.
    x = torch.zeros(n_bins, width, embeds.shape[-1], dtype=embeds.dtype, device=device)
    if branches.embeds.dim() == 2:  # the rows' tokens, each branch's start column replaced
        x[tok_bin, pos] = embeds[tok_row, tok_col]
        start_tok = seg_first_tok[n_rows:]
        x[tok_bin[start_tok], pos[start_tok]] = branches.embeds.to(embeds.dtype)
    else:
        n_trunk = int(seg_len[:n_rows].sum())
        t, b = slice(None, n_trunk), slice(n_trunk, None)
        x[tok_bin[t], pos[t]] = embeds[tok_row[t], tok_col[t]]
        x[tok_bin[b], pos[b]] = branches.embeds[tok_seg[b] - n_rows, tok_col[b]].to(embeds.dtype)
    positions = torch.zeros(n_bins, width, dtype=position_ids.dtype, device=device)
    positions[tok_bin, pos] = position_ids[tok_row, tok_col]
    # Per packed slot: its segment, column, segment's first column, row, and row if a trunk
    # token; padding: segment -1 (it sees padding only), row -1, trunk row -2 (no query's row).
    seg_trunk = torch.where(tok_seg < n_rows, tok_row, -2)
    slots = torch.tensor([-1, 0, 0, -1, -2], device=device)[:, None, None]
    slots = slots.repeat(1, n_bins, width)
    slots[:, tok_bin, pos] = torch.stack([tok_seg, tok_col, seg_start[tok_seg], tok_row, seg_trunk])

    def tree_mask(b0: int, b1: int, w: int) -> Tensor:
        """The attention mask of packed sequences ``b0 .. b1 - 1``, ``w`` wide. A query
        (segment g, column j) sees a key (g', j') with j' <= j from its own segment, and its
        row's tokens before g's start."""
        seg, col, start, row, _ = slots[:, b0:b1, :w, None]  # as queries, [bins, w, 1] each
        k_seg, k_col, _, _, k_trunk = slots[:, b0:b1, None, :w]  # as keys, [bins, 1, w] each
        ok = (seg == k_seg) & (k_col <= col)
        ok |= (k_trunk == row) & (k_col < start)
        zero = torch.zeros((), dtype=embeds.dtype, device=device)
        return torch.where(ok, zero, torch.finfo(embeds.dtype).min)[:, None]

    # The scored tokens, pass by pass.
    tail = tok_tail.nonzero().squeeze(-1)  # [T]
    tail = tail[torch.argsort(tok_bin[tail], stable=True)]
    in_pass = torch.bincount(pass_of_bin[tok_bin[tail]], minlength=n_passes).tolist()
    chosen_parts, logp_parts = [], []
    done = 0
    takes_keep = _takes_logits_to_keep(type(model))
    for p, (w, keep, n_tail) in enumerate(zip(widths, keeps, in_pass, strict=True)):
        b0, b1 = p * per_pass, min(n_bins, (p + 1) * per_pass)
        kwargs = {"logits_to_keep": keep} if takes_keep else {}
        with last_mlp_on_tail(model, w, keep):
            out = model(
                inputs_embeds=x[b0:b1, :w].contiguous(),
                attention_mask=tree_mask(b0, b1, w),
                position_ids=positions[b0:b1, :w].contiguous(),
                use_cache=False,
                **kwargs,
            )
        mine = tail[done : done + n_tail]
        done += n_tail
        logits = out.logits[:, -keep:]  # [bins of the pass, keep, vocab]
        tok_logits = logits[tok_bin[mine] - b0, pos[mine] - (w - keep)].float()  # [t, vocab]
        target = labels[tok_row[mine], tok_col[mine] + 1]  # [t]
        chosen = tok_logits.gather(-1, target[:, None]).squeeze(-1)  # [t]
        chosen_parts.append(chosen)
        logp_parts.append(chosen - tok_logits.logsumexp(-1))
    chosen, logp = torch.cat(chosen_parts), torch.cat(logp_parts)
    slot = tok_seg[tail] * k + tok_col[tail] + 1 - (seq - k)  # into [S, k]
    scored = score_mask[tok_row[tail], tok_col[tail] + 1]
    zero = torch.zeros((), dtype=logp.dtype, device=device)
    token_logp = torch.zeros(n_seg * k, dtype=logp.dtype, device=device)
    token_logits = torch.zeros(n_seg * k, dtype=logp.dtype, device=device)
    token_logp[slot] = torch.where(scored, logp, zero)
    token_logits[slot] = torch.where(scored, chosen, zero)
    token_logp, token_logits = token_logp.view(n_seg, k), token_logits.view(n_seg, k)
    shared = torch.bincount(bin_of_row, minlength=n_bins)[bin_of_row] > 1  # [batch]
    bad = ~(torch.isfinite(token_logp).all(-1) & torch.isfinite(token_logits).all(-1))  # [S]
    if bool((bad & shared[seg_row]).any()):
        # A NaN/inf in one tree reaches the others of its packed sequence (an attention weight
        # of exactly 0 times NaN is NaN): score every tree alone, so a faulty example does
        # not take its batch-mates with it.
        alone = Branches(
            branches.rows, branches.start, branches.embeds,
            packing=torch.arange(n_rows, device=device), passes=branches.passes,
        )  # fmt: skip
        return _packed_score_columns(
            model, embeds, attention_mask, position_ids, labels, score_mask, alone
        )
    return token_logp, token_logits


def prefix_cache(
    states: Sequence[tuple[Tensor, Tensor]], rows: Tensor, offset: int, start: int = 0
) -> Cache:
    """A fresh cache holding columns ``start .. offset - 1`` of ``states`` (per layer, keys and
    values ``[batch, heads, seq, head_dim]``) for the rows ``rows`` (an index tensor)."""
    return DynamicCache(
        ddp_cache_data=[(k[rows, :, start:offset], v[rows, :, start:offset]) for k, v in states]
    )


def cache_states(cache: Cache) -> list[tuple[Tensor, Tensor]]:
    """Per layer, the keys and values a cache holds."""
    return [(layer.keys, layer.values) for layer in cache.layers]


PREFIX_TARGETS: set[Callable] = set()
"""Target functions that take ``past=`` (:class:`Prefix`) and ``branches=`` (:class:`Branches`);
filled below."""


@contextlib.contextmanager
def last_mlp_on_tail(model: nn.Module, width: int, keep: int) -> Iterator[None]:
    """Within the block, the next forward over ``width`` columns, of which only the last
    ``keep`` are read (their logits), runs its last decoder layer's MLP on those ``keep``
    columns only.

    The other columns' last-layer outputs reach nothing that is read: no later layer attends
    to them, and their logits are not kept. The last layer's attention still reads every
    column's keys and values (computed before the MLP), so the kept columns' logits are those
    of the full pass up to floating-point rounding (the MLP works token by token; its matrix
    products then run on fewer rows), while a pass whose scored answer covers a third of the
    columns skips its last MLP on the other two thirds. Models where a probe (:func:`tail_mlp`,
    once per model) does not confirm this, and models in training mode, run the whole pass.

    Only the first call of the MLP in the block, on this thread, from the innermost such block
    is cut; other forward hooks on that MLP see its ``[batch, keep, d]`` output."""
    mlp = tail_mlp(model) if keep < width and not model.training else None
    if mlp is None:
        yield
        return
    with _TailOnly(mlp, width, keep):
        yield


class _TailOnly:
    """Hooks on an MLP that run its next call on the last ``keep`` of ``width`` columns and
    give zeros on the others; an input of another shape runs whole. Active on the entering
    thread, innermost block first."""

    _active = threading.local()  # .blocks: {id(mlp): the innermost _TailOnly on it}

    def __init__(self, mlp: nn.Module, width: int, keep: int) -> None:
        self.mlp, self.width, self.keep = mlp, width, keep
        self.cuts = 0  # calls cut to the tail (at most 1)
        self._cut = False

    def __enter__(self) -> _TailOnly:
        blocks = self._blocks()
        self._outer = blocks.get(id(self.mlp))
        blocks[id(self.mlp)] = self
        self.handles = [
            self.mlp.register_forward_pre_hook(self._before),
            self.mlp.register_forward_hook(self._after),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        blocks = self._blocks()
        if self._outer is None:
            blocks.pop(id(self.mlp), None)
        else:
            blocks[id(self.mlp)] = self._outer

    @classmethod
    def _blocks(cls) -> dict[int, _TailOnly]:
        if not hasattr(cls._active, "blocks"):
            cls._active.blocks = {}
        return cls._active.blocks

    def _before(self, module: nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        self._cut = (
            self.cuts == 0
            and self._blocks().get(id(self.mlp)) is self
            and isinstance(x, Tensor)
            and x.dim() == 3
            and x.shape[1] == self.width
        )
        if not self._cut:
            return None
        assert isinstance(x, Tensor)
        return (x[:, -self.keep :].contiguous(), *args[1:])  # contiguous: GPT-2's Conv1D views

    def _after(self, module: nn.Module, args: tuple, out: object) -> Tensor | None:
        if not self._cut:
            return None
        self._cut = False
        if not (isinstance(out, Tensor) and out.dim() == 3 and out.shape[1] == self.keep):
            raise RuntimeError(f"the last MLP gave {type(out).__name__}, not [batch, keep, d]")
        self.cuts += 1
        return F.pad(out, (0, 0, self.width - self.keep, 0))  # zeros where nothing reads


def last_decoder_mlp(model: nn.Module) -> nn.Module | None:
    """The MLP (child ``mlp``) of the last block of the model's list of
    ``config.num_hidden_layers`` decoder layers, or ``None``."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        return None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            mlp = getattr(module[-1], "mlp", None)
            if isinstance(mlp, nn.Module):
                return mlp
    return None


_TAIL_MLP: weakref.WeakKeyDictionary[nn.Module, nn.Module | None] = weakref.WeakKeyDictionary()

TAIL_PROBE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
"""Largest difference, relative to the largest logit, between a full pass and one whose last
MLP runs on the tail only that the probe takes for rounding; other dtypes: 1e-2."""


def tail_mlp(model: nn.Module) -> nn.Module | None:
    """The last decoder MLP where running it on the last columns only leaves their logits as
    they are (:func:`last_mlp_on_tail`), probed once per model on two 8-token sequences (last
    3 columns kept): a module that mixes tokens, takes or returns anything but
    ``[batch, seq, d]``, or fails (with a warning), is left alone. ``None``: run it whole."""
    if model not in _TAIL_MLP:
        mlp = last_decoder_mlp(model)
        if mlp is not None:
            try:
                mlp = mlp if _tail_probe(model, mlp) else None
            except torch.OutOfMemoryError:
                return None  # not cached: the next pass probes again
            except Exception as err:
                warnings.warn(
                    f"passes run their last MLP on every column for this model (the probe "
                    f"failed: {type(err).__name__}: {err})",
                    RuntimeWarning,
                    stacklevel=2,
                )
                mlp = None
        _TAIL_MLP[model] = mlp
    return _TAIL_MLP[model]


@torch.no_grad()
def _tail_probe(model: nn.Module, mlp: nn.Module) -> bool:
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    vocab = embedding.num_embeddings
    start = torch.tensor([[vocab // 3], [vocab // 2]], device=device)
    ids = (start + 5 * torch.arange(8, device=device)) % vocab  # [2, 8]
    x = embedding(ids)
    positions = torch.arange(8, device=device).expand(2, -1)
    mask = torch.ones_like(ids)
    full = model(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=False)
    with _TailOnly(mlp, 8, 3) as hooks:
        tail = model(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=False)
    if hooks.cuts != 1:
        return False
    a, b = full.logits[:, -3:].double(), tail.logits[:, -3:].double()
    tol = TAIL_PROBE_TOLERANCE.get(x.dtype, 1e-2)
    return bool((a - b).abs().max() <= tol * a.abs().max().clamp(min=1.0))


@functools.cache
def _takes_logits_to_keep(model_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_type.forward).parameters


CACHE_KWARGS = ("cache", "past_key_values")
"""The names a causal LM's ``forward`` takes its key/value cache by, newest first: transformers
5.24 renamed ``past_key_values=`` to ``cache=`` (the old name still works there, with a
``FutureWarning``); earlier releases, and models written against them, take only
``past_key_values=``."""


@functools.cache
def cache_kwarg(model_type: type) -> str | None:
    """The keyword ``model_type.forward`` takes a key/value cache by (one of
    :data:`CACHE_KWARGS`, the newest it declares), or ``None`` if it takes neither.

    Read once per class from the signature (``inspect.signature`` follows the
    ``functools.wraps`` of transformers' deprecation decorators to the real parameters), so a
    model is called with the spelling its own release expects, never the deprecated one. A
    ``forward`` that declares neither but takes ``**kwargs`` (a subclass that adds to its
    parent's and passes the rest on) is read through to the next class's ``forward``.
    """
    for cls in model_type.__mro__:
        forward = cls.__dict__.get("forward")
        if forward is None:
            continue
        params = inspect.signature(forward).parameters
        name = next((n for n in CACHE_KWARGS if n in params), None)
        if name is not None or not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return name
    return None


def answer_log_probs(
    model: nn.Module,
    embeds: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    labels: Tensor,
    score_mask: Tensor,
    past: Prefix | None = None,
    branches: Branches | None = None,
) -> Tensor:
    """Teacher-forced log-probabilities of the scored tokens, 0 elsewhere.

    Args:
        embeds: ``[batch, seq, d_model]`` input embeddings.
        attention_mask, position_ids, labels: ``[batch, seq]``.
        score_mask: ``[batch, seq]`` bool, the tokens to score (never column 0).
        past: the first columns' key/value states (:class:`Prefix`); ``None``: run them all.
        branches: copies of rows that differ from a column on, scored in the same pass
            (:class:`Branches`); their rows of the result follow the batch's.

    Returns:
        ``[batch, k]`` (``[batch + n, k]`` with ``branches``) log p of the token at each of the
        last ``k`` columns (``k`` covers every scored column), 0 where ``score_mask`` is False.
    """
    token_logp, _ = _score_columns(
        model, embeds, attention_mask, position_ids, labels, score_mask, past, branches
    )
    return token_logp


def _score_columns(
    model: nn.Module,
    embeds: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    labels: Tensor,
    score_mask: Tensor,
    past: Prefix | None = None,
    branches: Branches | None = None,
) -> tuple[Tensor, Tensor]:
    if branches is not None:
        if past is not None:
            raise ValueError("a call takes a key/value prefix or branches, not both")
        return _packed_score_columns(
            model, embeds, attention_mask, position_ids, labels, score_mask, branches
        )
    seq = embeds.shape[1]
    scored_cols = score_mask.any(0).nonzero()
    if scored_cols.numel() == 0:
        raise ValueError("no answer token to score")
    first = int(scored_cols.min())
    if first == 0:
        raise ValueError("column 0 cannot be scored: nothing precedes it")
    keep = seq - first + 1  # logits at columns first-1 .. seq-1
    kwargs = {"logits_to_keep": keep} if _takes_logits_to_keep(type(model)) else {}
    if past is None:
        kwargs["use_cache"] = False
    else:
        if past.offset > first - 1:
            raise ValueError(f"a prefix of {past.offset} columns covers a scored column")
        embeds, position_ids = embeds[:, past.offset :], position_ids[:, past.offset :]
        name = cache_kwarg(type(model))
        if name is None:
            raise TypeError(f"{type(model).__name__}.forward takes no key/value cache")
        kwargs.update({name: past.cache, "use_cache": True})
    with last_mlp_on_tail(model, embeds.shape[1], keep):
        out = model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **kwargs,
        )
    logits = out.logits[:, -keep:-1]  # [batch, k, vocab] predicting columns first .. seq-1
    target_ids = labels[:, first:]  # [batch, k]
    mask = score_mask[:, first:]  # [batch, k]
    token_logits = logits.gather(-1, target_ids[..., None]).squeeze(-1).float()  # [batch, k]
    token_logp = token_logits - logits.float().logsumexp(-1)  # [batch, k]
    zero = torch.zeros((), dtype=token_logp.dtype, device=token_logp.device)
    return torch.where(mask, token_logp, zero), torch.where(mask, token_logits, zero)


def log_prob(
    model: nn.Module,
    embeds: Tensor,
    inputs: TargetInputs,
    past: Prefix | None = None,
    branches: Branches | None = None,
) -> Tensor:
    """Sum over scored answer tokens of ``log p(token | prompt, earlier answer tokens)``.
    [batch] ([batch + n] with ``branches``)"""
    token_logp = answer_log_probs(
        model,
        embeds,
        inputs.attention_mask,
        inputs.position_ids,
        inputs.labels,
        inputs.score_mask,
        past,
        branches,
    )
    return token_logp.sum(-1)  # [batch]


def prob(
    model: nn.Module,
    embeds: Tensor,
    inputs: TargetInputs,
    past: Prefix | None = None,
    branches: Branches | None = None,
) -> Tensor:
    """Probability of the scored answer tokens, ``exp(log_prob)``. [batch]
    ([batch + n] with ``branches``)"""
    return log_prob(model, embeds, inputs, past, branches).exp()


def logit(
    model: nn.Module,
    embeds: Tensor,
    inputs: TargetInputs,
    past: Prefix | None = None,
    branches: Branches | None = None,
) -> Tensor:
    """Raw logit of the first scored answer token (no softmax). [batch] ([batch + n] with
    ``branches``)"""
    first_only = inputs.score_mask & (inputs.score_mask.long().cumsum(-1) == 1)  # [batch, seq]
    _, token_logits = _score_columns(
        model,
        embeds,
        inputs.attention_mask,
        inputs.position_ids,
        inputs.labels,
        first_only,
        past,
        branches,
    )
    return token_logits.sum(-1)  # [batch] one non-zero term per row


PREFIX_TARGETS.update({log_prob, prob, logit})


def contrast(model: nn.Module, embeds: Tensor, inputs: TargetInputs) -> Tensor:
    """``log p(answer) - log p(foil)``, both teacher-forced on the same prompt embeddings. [batch]

    The foil's tokens replace the answer's in the continuation slot, at the foil's own
    positions (a foil longer than the answer runs past the answer's end); the prompt part of
    ``embeds`` (perturbed or not) is shared by both passes.
    """
    if inputs.foil_labels is None or inputs.foil_score_mask is None:
        raise ValueError("the contrast target needs a foil answer for every prompt")
    assert inputs.foil_attention_mask is not None
    foil_embeds = model.get_input_embeddings()(inputs.foil_labels).to(embeds.dtype)
    embeds_f = torch.where(inputs.slot_mask[..., None], foil_embeds, embeds)  # [batch, seq, d]
    foil_logp = answer_log_probs(
        model,
        embeds_f,
        inputs.foil_attention_mask,
        inputs.position_ids if inputs.foil_position_ids is None else inputs.foil_position_ids,
        inputs.foil_labels,
        inputs.foil_score_mask,
    ).sum(-1)  # [batch]
    return log_prob(model, embeds, inputs) - foil_logp


TARGETS: dict[str, TargetFunction] = {
    "log_prob": log_prob,
    "prob": prob,
    "logit": logit,
    "contrast": contrast,
}
"""Target functions by name."""
