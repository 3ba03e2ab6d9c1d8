"""The CPU memory allocator: keep freed memory in the process instead of handing it back.

Attribution on a CPU allocates and frees blocks of the same few sizes pass after pass
(activations of a few MiB each). glibc's ``malloc`` hands the top of its heap back to the
operating system whenever more than its trim threshold lies free there (by default twice the
largest block freed so far), so the next pass takes the memory back one page fault per 4 KiB
page (page faults and times with and without it: ``docs/performance.md``). PyTorch's CPU
performance-tuning guide recommends the same through jemalloc or tcmalloc (``LD_PRELOAD``);
:func:`keep_freed_memory` does it with glibc's own ``mallopt``, no dependency.

The ``tokattr`` command and the benchmark (``bench/``) call :func:`keep_freed_memory` at start;
from Python, call it once yourself. ``TOKATTR_MALLOC=default`` leaves the allocator as it is.
"""

from __future__ import annotations

import ctypes
import os
import platform

MiB = 1024**2
TRIM_THRESHOLD = 256 * MiB
"""Free memory at the top of the heap that glibc keeps instead of returning (``M_TRIM_THRESHOLD``):
up to this much of what attribution freed stays in the process's resident memory."""
MMAP_THRESHOLD = 32 * MiB
"""Blocks at least this large get their own mapping, returned when freed (``M_MMAP_THRESHOLD``;
glibc's largest on 64-bit systems): smaller ones come from the heap and are reused."""
TOP_PAD = 32 * MiB
"""Extra memory glibc takes each time the heap grows (``M_TOP_PAD``): fewer, larger growths."""

KEPT = (
    f"glibc malloc keeps freed memory (trim threshold {TRIM_THRESHOLD // MiB} MiB, mmap "
    f"threshold {MMAP_THRESHOLD // MiB} MiB, top pad {TOP_PAD // MiB} MiB)"
)
"""What :func:`allocator` says once :func:`keep_freed_memory` applied its settings."""

ENV = "TOKATTR_MALLOC"
"""``keep`` (default): :func:`keep_freed_memory` applies its settings; ``default``: it does
nothing."""

_SETTINGS = ((-1, TRIM_THRESHOLD), (-3, MMAP_THRESHOLD), (-2, TOP_PAD))  # glibc's M_* numbers
_GLIBC_ENV = (
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_state: str | None = None  # what keep_freed_memory found or did, once it has run


def keep_freed_memory() -> bool:
    """Have glibc's ``malloc`` keep freed memory for reuse (see the module's docstring):
    ``True`` where it now does (this call or an earlier one), ``False`` where the allocator is
    left as it is: not glibc, ``TOKATTR_MALLOC=default``, the environment already tunes glibc's
    malloc (``MALLOC_*_`` variables, ``GLIBC_TUNABLES``), or another allocator is preloaded.
    :func:`allocator` says which. Process-wide and for the rest of the process: freed memory,
    up to :data:`TRIM_THRESHOLD`, stays resident.

    Raises:
        ValueError: ``TOKATTR_MALLOC`` is neither ``keep`` nor ``default``.
    """
    global _state
    choice = os.environ.get(ENV, "keep").strip().lower() or "keep"
    if choice not in ("keep", "default"):
        raise ValueError(f"{ENV} must be 'keep' or 'default', got {os.environ[ENV]!r}")
    if _state is None:
        _state = _why_not(choice) or _apply()
    return _state == KEPT


def allocator() -> str:
    """What :func:`keep_freed_memory` found or did, in words (for logs and benchmark results);
    ``"not set by tokattr"`` before it has run."""
    return _state or "not set by tokattr"


def malloc_env() -> dict[str, str]:
    """Environment variables that give a new process (started from this one) the settings
    :func:`keep_freed_memory` applied (glibc reads them at the process's start; there
    :func:`keep_freed_memory` takes them for its own and applies the same values); empty where
    it did not apply them."""
    return _env() if _state == KEPT else {}


def _env() -> dict[str, str]:
    return {
        "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
        "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
        "MALLOC_TOP_PAD_": str(TOP_PAD),
    }


def _why_not(choice: str) -> str | None:
    if choice == "default":
        return f"allocator left as it is ({ENV}=default)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "allocator left as it is (not glibc)"
    ours = _env()  # a process started with malloc_env() has them: not somebody else's choice
    tuned = [name for name in _GLIBC_ENV if os.environ.get(name, ours.get(name)) != ours.get(name)]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        tuned.append("GLIBC_TUNABLES")
    if tuned:
        return f"glibc malloc as the environment sets it ({', '.join(tuned)})"
    preload = os.environ.get("LD_PRELOAD", "")
    other = [name for name in _OTHER_ALLOCATORS if name in preload]
    if other:
        return f"{other[0]} (LD_PRELOAD)"
    return None


def _apply() -> str:
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError) as err:
        return f"allocator left as it is (no mallopt: {err})"
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    refused = [param for param, value in _SETTINGS if mallopt(param, value) != 1]
    if refused:
        return f"glibc malloc partly tuned (mallopt refused parameters {refused})"
    return KEPT
