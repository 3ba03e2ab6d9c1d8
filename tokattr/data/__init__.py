"""Prompts and their structure: the arithmetic generator, its tokenizer, token labels."""

from tokattr.data.arithmetic import (
    BUCKETS,
    DEFAULT_MIX,
    FORMATTED_BUCKETS,
    ROLES,
    ArithmeticGenerator,
    ArithmeticProblem,
    format_number,
    label_prompt,
    make_problem,
    read_jsonl,
    solve,
    with_demonstrations,
)
from tokattr.data.labels import token_roles

__all__ = [
    "BUCKETS",
    "DEFAULT_MIX",
    "FORMATTED_BUCKETS",
    "ROLES",
    "ArithmeticGenerator",
    "ArithmeticProblem",
    "format_number",
    "label_prompt",
    "make_problem",
    "read_jsonl",
    "solve",
    "token_roles",
    "with_demonstrations",
]
