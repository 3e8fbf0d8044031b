"""Mutation check: plant each bug of ``bench/mutant_list.py`` one at a time and run the fast tests of its module.

A mutant is *killed* when a test fails (or the run errors or times out). The score is killed / planted;
every mutant in the list changes behaviour (none is equivalent by construction; a survivor is a gap in the
tests, or a mutant to rewrite). Only fast tests run (``-m "not multiproc and not slow"``), with ``-x``.

The mutants are planted in a copy of ``adapter/`` and ``tests/`` in a temporary folder, never in the working
tree, so an interrupted run leaves nothing behind. The heavy imports (torch, transformers, megatron-core,
DeepSpeed) are done once here; each mutant runs pytest in a forked child that imports the mutated
``adapter`` afresh, so a mutant costs its tests' run time, not 20 s of imports.

    .venv/bin/python bench/mutants.py                    # every mutant (a few minutes on 2 CPUs)
    .venv/bin/python bench/mutants.py --group schedules  # one module group (see GROUPS)
    .venv/bin/python bench/mutants.py --list             # the mutants, without running them
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from mutant_list import DESELECT, GROUPS, MUTANTS, Mutant  # noqa: E402

PYTEST_ARGS = ["-q", "-x", "-p", "no:cacheprovider", "-m", "not multiproc and not slow", "--hypothesis-seed=0",
               *[f"--deselect={d}" for d in DESELECT]]


def group_of(mutant: Mutant) -> str:
    return next(name for name, (files, _) in GROUPS.items() if mutant.path in files)


def sandbox() -> Path:
    """A copy of the package and tests (fixtures, configs and launch files linked, not copied)."""
    box = Path(tempfile.mkdtemp(prefix="mutants-"))
    skip = shutil.ignore_patterns("__pycache__", "fixtures")
    shutil.copytree(ROOT / "adapter", box / "adapter", ignore=skip)
    shutil.copytree(ROOT / "tests", box / "tests", ignore=skip)
    (box / "tests" / "fixtures").symlink_to(ROOT / "tests" / "fixtures")
    for name in ("internlm_configs", "launch"):
        (box / name).symlink_to(ROOT / name)
    shutil.copy(ROOT / "setup.cfg", box / "setup.cfg")
    return box


def preload() -> None:
    """Import what every test imports, before forking (nothing from ``adapter``)."""
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("numpy", "torch", "yaml", "safetensors.torch", "hypothesis", "pytest", "transformers",
                 "megatron.core", "deepspeed"):
        try:
            __import__(name)
        except ImportError:
            pass


def run_tests(box: Path, tests: list[str], log: Path, timeout: float) -> str:
    """Run ``tests`` in a forked child inside ``box``: ``passed``, ``failed`` or ``timeout``."""
    pid = os.fork()
    if pid == 0:  # child
        os.chdir(box)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.path.insert(0, str(box))
        import pytest

        code = pytest.main([*PYTEST_ARGS, *tests])
        sys.stdout.flush()
        os._exit(int(code))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "passed" if os.waitstatus_to_exitcode(status) == 0 else "failed"
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "timeout"


def first_failure(log: Path) -> str:
    """The test that killed the mutant, from pytest's summary (``-x``: the first one)."""
    lines = log.read_text(errors="replace").splitlines()
    return next((line.split()[1] for line in lines if line.startswith(("FAILED ", "ERROR ")) and " " in line), "")


def plant(box: Path, mutant: Mutant) -> str:
    """Write the mutant into the sandbox; returns the original text to restore."""
    path = box / mutant.path
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(f"{mutant.path}: the text of mutant {mutant.what!r} occurs {count} times; update "
                         "bench/mutant_list.py to the current code")
    path.write_text(text.replace(mutant.old, mutant.new))
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", choices=sorted(GROUPS), action="append", help="only these module groups")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per test run (default 300)")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if args.group is None or group_of(m) in args.group]
    if args.list:
        for m in mutants:
            print(f"{group_of(m):13} {m.path:38} {m.what}")
        return 0

    sys.dont_write_bytecode = True  # a mutant of the same size and mtime must not reuse a stale .pyc
    preload()
    box = sandbox()
    try:
        log = box / "pytest.log"
        for name in sorted({group_of(m) for m in mutants}):
            if run_tests(box, GROUPS[name][1], log, args.timeout) != "passed":
                print(log.read_text()[-3000:])
                raise SystemExit(f"the {name} tests fail without a mutant")
        results: dict[str, list[tuple[Mutant, str, float]]] = {}
        for i, m in enumerate(mutants, 1):
            original = plant(box, m)
            start = time.monotonic()
            try:
                outcome = run_tests(box, GROUPS[group_of(m)][1], log, args.timeout)
            finally:
                (box / m.path).write_text(original)
            seconds = time.monotonic() - start
            results.setdefault(group_of(m), []).append((m, outcome, seconds))
            mark = "SURVIVED" if outcome == "passed" else outcome
            print(f"[{i:3}/{len(mutants)}] {mark:8} {seconds:6.1f}s  {m.path}: {m.what}  {first_failure(log)}",
                  flush=True)
    finally:
        shutil.rmtree(box, ignore_errors=True)
    report(results)
    return 0


def report(results: dict[str, list[tuple["Mutant", str, float]]]) -> None:
    print("\n| module group | planted | killed | score |\n|---|---|---|---|")
    total = killed = 0
    for name, rows in results.items():
        k = sum(outcome != "passed" for _, outcome, _ in rows)
        total, killed = total + len(rows), killed + k
        print(f"| {name} | {len(rows)} | {k} | {100 * k / len(rows):.0f}% |")
    print(f"| **all** | {total} | {killed} | **{100 * killed / total:.1f}%** |")
    survivors = [m for rows in results.values() for m, outcome, _ in rows if outcome == "passed"]
    for m in survivors:
        print(f"survived: {m.path}: {m.what}")


if __name__ == "__main__":
    sys.exit(main())
