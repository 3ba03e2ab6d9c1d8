"""Prompts and their structure: the arithmetic generator, its tokenizer, token labels, the
key-value lookup generator (answers from one known part of a long context), and prompts read
from a JSONL file."""

from tokattr.data.arithmetic import (
    ROLES,
    ArithmeticGenerator,
    ArithmeticProblem,
    label_prompt,
    make_problem,
    solve,
    with_demonstrations,
)
from tokattr.data.buckets import BUCKETS, DEFAULT_MIX, FORMATTED_BUCKETS
from tokattr.data.jsonl import read_jsonl
from tokattr.data.labels import token_roles
from tokattr.data.lookup import LookupGenerator, LookupProblem
from tokattr.data.numbers import format_number

__all__ = [
    "BUCKETS",
    "DEFAULT_MIX",
    "FORMATTED_BUCKETS",
    "ROLES",
    "ArithmeticGenerator",
    "ArithmeticProblem",
    "LookupGenerator",
    "LookupProblem",
    "format_number",
    "label_prompt",
    "make_problem",
    "read_jsonl",
    "solve",
    "token_roles",
    "with_demonstrations",
]
