"""keep_freed_memory: glibc keeps freed memory (fewer page faults), unless told or already set."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from tokattr import allocator, cli
from tokattr.cli import main

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Minor page faults per occlusion call on the bundled model (32 prompts), after two warm-ups.
FAULTS = """
import json, resource, sys
import tokattr
import tokattr.allocator
kept = tokattr.allocator.keep_freed_memory()
from tokattr.data.arithmetic import ArithmeticGenerator
lm = tokattr.load_model("arith-tiny")
problems = ArithmeticGenerator(seed=4242).take(32)  # the benchmark's prompts
prompts, answers = [p.prompt for p in problems], [p.answer for p in problems]
def call():
    tokattr.attribute(lm, prompts, method="occlusion", target=answers)
call(); call()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    call()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"kept": kept, "faults": faults, "allocator": tokattr.allocator.allocator()}))
"""


def _faults(env: dict[str, str]) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", FAULTS],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_kept_freed_memory_takes_fewer_page_faults():
    default = _faults({"TOKATTR_MALLOC": "default"})
    kept = _faults({})
    assert default["kept"] is False and "TOKATTR_MALLOC=default" in default["allocator"]
    assert kept["kept"] is True and kept["allocator"] == allocator.KEPT
    if default["faults"] < 500:
        pytest.skip(f"glibc's defaults took only {default['faults']:.0f} faults a call here")
    assert kept["faults"] < default["faults"] / 10, (kept, default)


@pytest.fixture
def fresh(monkeypatch):
    """keep_freed_memory as if not yet called, with no allocator settings in the environment;
    applying them fails the test unless a test allows it."""
    monkeypatch.setattr(allocator, "_state", None)
    for name in (*allocator._GLIBC_ENV, "GLIBC_TUNABLES", "LD_PRELOAD", allocator.ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(allocator, "_apply", lambda: pytest.fail("mallopt called"))
    return monkeypatch


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("TOKATTR_MALLOC", "default", "TOKATTR_MALLOC=default"),
        ("TOKATTR_MALLOC", " Default ", "TOKATTR_MALLOC=default"),
        ("MALLOC_TRIM_THRESHOLD_", "1000000", "MALLOC_TRIM_THRESHOLD_"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000", "GLIBC_TUNABLES"),
        ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "jemalloc"),
    ],
)
def test_an_allocator_already_chosen_is_left_alone(fresh, name, value, says):
    if not GLIBC and name != "TOKATTR_MALLOC":
        pytest.skip("glibc's malloc only")
    fresh.setenv(name, value)
    assert allocator.keep_freed_memory() is False
    assert says in allocator.allocator()
    assert allocator.malloc_env() == {}


def test_not_glibc_is_left_alone(fresh):
    fresh.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.keep_freed_memory() is False
    assert allocator.allocator() == "allocator left as it is (not glibc)"


def test_a_bad_setting_is_refused(fresh, capsys):
    fresh.setenv("TOKATTR_MALLOC", "fast")
    with pytest.raises(ValueError, match="TOKATTR_MALLOC must be 'keep' or 'default', got 'fast'"):
        allocator.keep_freed_memory()
    assert main(["eval-model", "--help"]) == 1
    assert "TOKATTR_MALLOC must be" in capsys.readouterr().err


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_applied_once_and_handed_to_new_processes(fresh):
    calls = []
    fresh.setattr(allocator, "_apply", lambda: calls.append(1) or allocator.KEPT)
    assert allocator.allocator() == "not set by tokattr"
    assert allocator.keep_freed_memory() is True
    assert allocator.keep_freed_memory() is True
    assert calls == [1]
    assert allocator.malloc_env() == {
        "MALLOC_TRIM_THRESHOLD_": str(allocator.TRIM_THRESHOLD),
        "MALLOC_MMAP_THRESHOLD_": str(allocator.MMAP_THRESHOLD),
        "MALLOC_TOP_PAD_": str(allocator.TOP_PAD),
    }


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_a_process_started_with_the_settings_knows_them(fresh):
    calls = []
    fresh.setattr(allocator, "_apply", lambda: calls.append(1) or allocator.KEPT)
    for name, value in allocator._env().items():
        fresh.setenv(name, value)
    assert allocator.keep_freed_memory() is True
    assert allocator.allocator() == allocator.KEPT and calls == [1]  # the same values again
    fresh.setattr(allocator, "_state", None)
    fresh.setenv("MALLOC_TOP_PAD_", "1")  # somebody else's value: theirs
    assert allocator.keep_freed_memory() is False


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_the_command_hands_the_settings_to_its_workers(fresh):
    fresh.setattr(allocator, "_apply", lambda: allocator.KEPT)
    fresh.setitem(cli.COMMANDS, "noop", (lambda argv: 0, "-"))
    assert main(["noop"]) == 0
    assert {k: os.environ.get(k) for k in allocator._env()} == allocator._env()


def test_every_command_keeps_freed_memory_first(fresh):
    order = []
    fresh.setattr(allocator, "keep_freed_memory", lambda: order.append("allocator"))
    fresh.setitem(cli.COMMANDS, "noop", (lambda argv: order.append(("noop", argv)) or 0, "-"))
    assert main(["noop", "--x"]) == 0
    assert order == ["allocator", ("noop", ["--x"])]
