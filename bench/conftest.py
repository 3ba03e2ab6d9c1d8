"""pytest wiring of the benchmark: options, the session fixture, results at the end.

Options (each also read from an environment variable):

- ``--bench-scale quick|full`` (``TOKATTR_BENCH_SCALE``; default quick on CPU, full on CUDA)
- ``--bench-dtype fp32|bf16`` (``TOKATTR_BENCH_DTYPE``; default fp32)
- ``--bench-name NAME``: results file stem (``TOKATTR_BENCH_NAME``; default ``<device>-<dtype>``)
- ``--bench-peers captum,inseq|none`` (``TOKATTR_BENCH_PEERS``; default both)
- ``--bench-batch-size N``: tokattr's ``batch_size`` (default: tokattr's own choice)
- ``--bench-peer-budget S``: estimated seconds above which a peer runs on fewer prompts
  (default 120 quick, 3600 full)
- ``--bench-memory-budget GIB``: the IG memory case's budget (default 2.5 on CPU, 8 on CUDA)
- ``--bench-fresh``: drop the rows of earlier sessions from ``bench/results/<name>.json``

The session first calls :func:`tokattr.allocator.keep_freed_memory` (``TOKATTR_MALLOC=default``:
glibc's defaults), as the ``tokattr`` command does; each row records the allocator it ran with.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import _harness as h
from bench._report import markdown, write_results
from bench._session import Session
from tokattr.allocator import keep_freed_memory

SESSION_KEY = pytest.StashKey[Session]()
WRITTEN_KEY = pytest.StashKey[tuple[Path, Path, Path | None, str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tokattr-bench", "tokattr performance benchmark")
    group.addoption("--bench-scale", choices=("quick", "full"), default=None)
    group.addoption("--bench-dtype", choices=("fp32", "bf16"), default=None)
    group.addoption("--bench-name", default=None)
    group.addoption("--bench-peers", default=None, help="captum,inseq (default) or none")
    group.addoption("--bench-batch-size", type=int, default=None)
    group.addoption("--bench-peer-budget", type=float, default=None)
    group.addoption("--bench-memory-budget", type=float, default=None)
    group.addoption("--bench-fresh", action="store_true", default=False)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # As the tokattr command does: glibc keeps freed memory (for Captum too, in this process;
    # the Inseq and memory workers get the same settings through their environment).
    keep_freed_memory()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The project turns warnings into errors; here they are reported, not fatal (Captum
    warns on every LLM call)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(
                pytest.mark.filterwarnings(
                    "default", "ignore::UserWarning:captum.*", "ignore::FutureWarning:captum.*"
                )
            )


def _session(config: pytest.Config) -> Session:
    if SESSION_KEY not in config.stash:
        opt = config.getoption
        config.stash[SESSION_KEY] = Session(
            h.default_config(
                scale=opt("--bench-scale"),
                dtype=opt("--bench-dtype"),
                name=opt("--bench-name"),
                peers=opt("--bench-peers"),
                batch_size=opt("--bench-batch-size"),
                fresh=opt("--bench-fresh"),
                peer_budget_s=opt("--bench-peer-budget"),
                memory_budget_gib=opt("--bench-memory-budget"),
            )
        )
    return config.stash[SESSION_KEY]


@pytest.fixture(scope="session")
def session(pytestconfig: pytest.Config) -> Session:
    """The benchmark session (models, prompts, floors, results store)."""
    return _session(pytestconfig)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Write ``bench/results/<name>.{json,md,png}`` when anything was measured."""
    bench = session.config.stash.get(SESSION_KEY, None)
    if bench is None or bench.store.empty:
        return
    json_path, md_path, png_path, result = write_results(bench.store)
    session.config.stash[WRITTEN_KEY] = (json_path, md_path, png_path, markdown(result))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the results table and where the files went."""
    written = terminalreporter.config.stash.get(WRITTEN_KEY, None)
    if written is None:
        return
    json_path, md_path, png_path, table = written
    terminalreporter.section("tokattr performance benchmark")
    for line in table.splitlines():
        terminalreporter.write_line(line)
    terminalreporter.write_line("")
    for p in (json_path, md_path, png_path):
        if p is not None:
            terminalreporter.write_line(f"wrote {p}")
