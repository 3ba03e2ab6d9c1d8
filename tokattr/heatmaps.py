"""The numbers of a token x column heatmap: one attribution per column, the query's rows kept.

One query's tokens as rows, one column per demonstration placed before the query (or per
method), each cell the token's attribution. :func:`plan_columns` checks a layout without a
model; :func:`heatmap_matrix` runs the model (:func:`tokattr.attribute` once per column).
Drawing the matrix is :mod:`tokattr.plots`, which needs no model code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from tokattr.accuracy import greedy_answers
from tokattr.attribution import Attribution, attribute
from tokattr.batching import encode_example
from tokattr.data.arithmetic import SEPARATOR, with_demonstrations
from tokattr.models import LanguageModel
from tokattr.validation import method_parameters

Span = tuple[int, int]  # a token's characters [start, end) in the text it came from


class Heatmap(NamedTuple):
    """What a heatmap shows: ``matrix[i, j]`` is ``tokens[i]``'s score in column ``labels[j]``."""

    tokens: list[str]  # the query's tokens (see heatmap_matrix for their spelling)
    labels: list[str]  # one per column
    matrix: Tensor  # [len(tokens), len(labels)] float32 CPU


class Column(NamedTuple):
    """One column to compute: its label, the full prompt, the method and its parameters."""

    label: str
    prompt: str
    method: str
    params: dict[str, object]


def plan_columns(
    query: str,
    columns: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    method: str = "integrated_gradients",
    method_params: Mapping[str, object] | None = None,
) -> list[Column]:
    """Check a heatmap's layout and spell out its columns, without touching a model.

    Exactly one of ``columns`` (demonstrations placed before the query, one column each; a
    column may hold several, joined by ``;``) and ``methods`` (the bare query, one column per
    method) is given. ``method_params`` go to every method that takes them.

    Raises:
        ValueError: an empty query; both or neither of ``columns`` / ``methods``; an empty,
            empty-part or repeated column; an unknown method; a parameter no method takes.
    """
    if not isinstance(query, str) or not query:
        raise ValueError(f"empty query: {query!r}; give the prompt to attribute, e.g. '7x5='")
    if columns is not None and methods is not None:
        raise ValueError("give either columns (demonstrations) or methods as columns, not both")
    if not columns and not methods:
        raise ValueError("no columns: give demonstrations (--columns) or methods (--methods)")
    labels = list(columns if columns is not None else methods)
    repeated = sorted({c for c in labels if labels.count(c) > 1})
    if repeated:
        raise ValueError(f"repeated column(s) {repeated}: every column needs its own label")

    names = [method] * len(labels) if columns is not None else labels
    params = dict(method_params or {})
    accepted = {m: method_parameters(m) for m in names}  # raises on an unknown method
    unused = sorted(k for k in params if not any(k in a for a in accepted.values()))
    if unused:
        raise ValueError(
            f"parameter(s) {unused} are taken by none of the methods {sorted(set(names))}"
        )

    plan = []
    for label, name in zip(labels, names, strict=True):
        prompt = query if columns is None else _prompt_with(label, query)
        mine = {k: v for k, v in params.items() if k in accepted[name]}
        plan.append(Column(label, prompt, name, mine))
    return plan


def _prompt_with(column: str, query: str) -> str:
    # A column may carry several demonstrations; each part must be a real one, since an empty
    # part would put a bare ';' in front of the query, which the data set never does.
    parts = column.split(SEPARATOR)
    if not all(p.strip() for p in parts):
        raise ValueError(f"empty demonstration in column {column!r}")
    return with_demonstrations(parts, query)


def default_target(lm: LanguageModel, query: str) -> str:
    """The model's greedy answer to the bare query: the answer every column attributes."""
    (answer,) = greedy_answers(lm, [query])
    if not answer:
        raise ValueError(f"the model's greedy answer to {query!r} is empty; give a target")
    return answer


def heatmap_matrix(
    lm: LanguageModel,
    query: str,
    columns: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    method: str = "integrated_gradients",
    target: str | None = None,
    baseline: str = "pad",
    seed: int | None = 0,
    batch_size: int | None = None,
    method_params: Mapping[str, object] | None = None,
    features: str = "token",
) -> Heatmap:
    """Attribute one query under several columns and keep the query's tokens' scores (or
    its words', sentences', ... with ``features``: the query's features are the rows).

    With ``columns``, column ``j`` attributes the prompt ``columns[j] + ";" + query`` with
    ``method``; with ``methods``, column ``j`` attributes the bare query with ``methods[j]``.
    Every column attributes the *same* answer: ``target``, or by default the model's greedy
    answer to the bare query (a demonstration may change the greedy answer, and scores of
    different answers are not comparable across a row). Each column is one
    :func:`tokattr.attribute` call with ``seed``, so a column does not depend on the others.

    Returns:
        :class:`Heatmap` with ``matrix`` ``[len(query tokens), len(columns)]``. The query is
        the suffix of every prompt; its tokens are found through the token offsets. Rows are
        named as the tokenizer spells the bare query (``▁$`` in the seed figure, where the
        prompt after a demonstration spells ``$``) when both cut the query at the same
        characters, else as the prompts spell it (a bare ``7x5=`` is ``▁ 7 x 5 =``, after a
        demonstration ``7 x 5 =``: the lone word-start ``▁`` has no row).

    Raises:
        ValueError: see :func:`plan_columns` and :func:`tokattr.attribute`; a token across
            the boundary between demonstrations and query, or a query split differently in
            different columns.
    """
    plan = plan_columns(query, columns, methods, method, method_params)
    answer = default_target(lm, query) if target is None else target
    scores = []  # one [query tokens] tensor per column
    split: tuple[list[str], list[Span]] | None = None  # the query's tokens, spans in context
    for col in plan:
        res = attribute(
            lm,
            col.prompt,
            method=col.method,
            target=answer,
            baseline=baseline,
            seed=seed,
            batch_size=batch_size,
            features=features,
            **col.params,
        )
        start = len(res.prompt) - len(query)
        if features == "token":
            rows = query_positions(res, query)  # [query tokens]
            names, spans = res.tokens, res.offsets
        else:
            rows = query_features(res, query)  # [query features]
            names, spans = res.features, res.spans
        mine = (
            [names[i] for i in rows],
            [(spans[i][0] - start, spans[i][1] - start) for i in rows],
        )
        if split is not None and mine != split:
            raise ValueError(
                f"the query {query!r} is split into {split[0]} in column {plan[0].label!r} "
                f"but into {mine[0]} in column {col.label!r}: its rows would not line up"
            )
        split = mine
        scores.append(res.scores[rows])
    if features == "token":
        bare, bare_spans = query_tokens(lm, query, answer)
        tokens = bare if bare_spans == split[1] else split[0]
    else:
        tokens = split[0]
    matrix = torch.stack(scores, dim=1)  # [tokens, columns]
    return Heatmap(tokens, [c.label for c in plan], matrix)


def query_features(res: Attribution, query: str) -> Tensor:
    """Indices into ``res.features`` of the features inside the query (the suffix of
    ``res.prompt``): ``[query features]``.

    Raises:
        ValueError: the prompt does not end with the query, a feature runs across its start,
            or the query holds no feature.
    """
    if not res.prompt.endswith(query):
        raise ValueError(f"prompt {res.prompt!r} does not end with the query {query!r}")
    start = len(res.prompt) - len(query)
    across = [f for f, (a, b) in zip(res.features, res.spans, strict=True) if a < start < b]
    if across:
        raise ValueError(
            f"feature(s) {across} run across the start of the query {query!r}: choose features "
            "that end at the separator (e.g. features='separator:;')"
        )
    rows = [i for i, (a, _) in enumerate(res.spans) if a >= start]
    if not rows:
        raise ValueError(f"the query {query!r} holds no feature")
    return torch.tensor(rows)


def query_tokens(lm: LanguageModel, query: str, answer: str) -> tuple[list[str], list[Span]]:
    """The bare query's features (no BOS or other special token) as attribute() sees them,
    and their character spans."""
    enc = encode_example(lm.tokenizer, query, answer, max_length=lm.max_length)
    keep = [i for i, special in enumerate(enc.special) if not special]
    tokens = lm.tokenizer.convert_ids_to_tokens([enc.prompt_ids[i] for i in keep])
    return tokens, [enc.offsets[i] for i in keep]


def query_positions(res: Attribution, query: str) -> Tensor:
    """Indices into ``res.tokens`` of the query, the suffix of ``res.prompt``: ``[query tokens]``.

    Raises:
        ValueError: the prompt does not end with the query; no character offsets (a slow
            tokenizer) to find it by; a token across the boundary before the query.
    """
    if not res.prompt.endswith(query):
        raise ValueError(f"prompt {res.prompt!r} does not end with the query {query!r}")
    start = len(res.prompt) - len(query)
    if start > 0 and all(o == (0, 0) for o in res.offsets):
        raise ValueError("the tokenizer gives no character offsets; use a fast tokenizer")
    across = [t for t, (a, b) in zip(res.tokens, res.offsets, strict=True) if a < start < b]
    if across:
        raise ValueError(
            f"token(s) {across} of {res.prompt!r} run across the start of the query {query!r}: "
            "its rows would not line up"
        )
    return torch.tensor([i for i, (a, _) in enumerate(res.offsets) if a >= start])
