"""Packed tree passes: a row and its branches (copies that differ from a column on) scored
in one sequence under a tree attention mask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from tokattr.engine.tail import _takes_logits_to_keep, last_mlp_on_tail

if TYPE_CHECKING:
    from tokattr.targets import TargetInputs


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
