"""Mutation testing of advlab's core: the modules every reported number depends on.

Runs mutmut 3 on each core module against a fast subset of the tests that exercise it, and prints
one table: module, mutants, killed, survived, equivalent, score = killed / (mutants - equivalent).
Slow (minutes per module on a laptop); not run in CI.

    python benchmarks/mutation.py                     # every module
    python benchmarks/mutation.py --module robustness --jobs 2
    python benchmarks/mutation.py --module geometry --survivors   # print each survivor's diff

How it drives mutmut: mutmut reads its configuration from ``pyproject.toml`` in the folder it runs
in and works in ``mutants/`` there. For each module this script makes a work folder
``mutants/<module>/`` (``mutants/`` is git-ignored) holding links to ``src`` and ``tests`` and a
``pyproject.toml`` that is the repository's (so pytest keeps its options and markers) plus a
``[tool.mutmut]`` section naming that one module (``only_mutate``) and its test files
(``pytest_add_cli_args_test_selection``), then runs ``python -m mutmut run`` there. mutmut copies
the package into ``mutants/<module>/mutants/src`` (src layout: it puts that folder first on
``sys.path`` and removes ``src``), records which tests call which mutated function, and runs for
each mutant only the tests that reach it. The work folder is wiped first, so every run measures
the code and tests as they are. Results are read back from mutmut's ``.meta`` files.

Equivalent mutants (no test could tell them from the original) are listed in
``benchmarks/mutation_equivalent.yaml``, keyed by module, function and the mutated line before and
after (stable when other code moves), each with a one-line reason.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "mutants"
EQUIVALENT = Path(__file__).with_name("mutation_equivalent.yaml")

#: the gradient-attack tests that attack a trained LeNet for seconds (18 s for the 200-step
#: targeted one); the projections they rely on are unit-tested in milliseconds
SLOW_TARGETED = "tests/test_attacks_gradient.py::test_targeted_reaches_target"
SLOW_GRADIENT = [SLOW_TARGETED] + [f"tests/test_attacks_gradient.py::{t}" for t in (
    "test_iterative_beats_single_step", "test_early_stop_and_restarts", "test_pgd_linf_robust_accuracy",
    "test_l2_attacks_reasonable", "test_constraints_hold_exactly")]

#: the seams tests that run real attacks on a trained LeNet (2-5 s each, every one of them calls
#: the success rule): the unit tests of the rules cover the same code in milliseconds
SLOW_SEAMS = ["tests/test_seams.py::test_a_judge_that_rejects_every_adversarial",
              "tests/test_seams.py::test_defense_contract_and_registry",
              "tests/test_seams.py::test_worst_case_is_never_above_any_single_attack"]

#: module name -> (source file, the fast tests that exercise it, node ids to leave out)
MODULES = {
    "robustness": ("src/advlab/metrics/robustness.py",
                   ["tests/test_core_rules.py", "tests/test_seams.py", "tests/test_chain.py"], SLOW_SEAMS),
    "result": ("src/advlab/attacks/result.py",
               ["tests/test_core_rules.py", "tests/test_seams.py", "tests/test_chain.py"], SLOW_SEAMS),
    "geometry": ("src/advlab/attacks/geometry.py",
                 ["tests/test_core_geometry.py", "tests/test_attacks_gradient.py"], SLOW_GRADIENT),
    "runner": ("src/advlab/eval/runner.py",
               ["tests/test_core_runner.py", "tests/test_chain.py", "tests/test_seams.py"], SLOW_SEAMS),
    "checks": ("src/advlab/eval/checks.py",
               ["tests/test_core_checks.py", "tests/test_checks.py"], []),
    "similarity": ("src/advlab/metrics/similarity.py",
                   ["tests/test_core_similarity.py", "tests/test_similarity.py"],
                   ["tests/test_similarity.py::test_gradients_are_correct_and_finite"]),  # 70 s of gradcheck
    "loop": ("src/advlab/attacks/loop.py",
             ["tests/test_core_loop.py", "tests/test_attacks_gradient.py", "tests/test_seams.py"],
             [*SLOW_GRADIENT, *SLOW_SEAMS]),
}

#: mutmut exit codes (mutmut.stats.status_by_exit_code) folded into the table's columns
KILLED = {1, 3, 36, 24, -24, 152, 255, 37, -11, -9}   # failed tests, timeout, crash: the mutant was noticed
SURVIVED = {0}
NO_TESTS = {5, 33}


def _toml_list(items) -> str:
    return "[" + ", ".join(json.dumps(str(i)) for i in items) + "]"


def _existing(paths):
    return [p for p in paths if (REPO / p).exists()]


def prepare(name: str, skip=(), work: Path | None = None) -> Path:
    """A fresh work folder for one module, with its pyproject carrying the [tool.mutmut] section."""
    source, tests, deselect = MODULES[name]
    work = work or WORK / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / "src").symlink_to(REPO / "src", target_is_directory=True)
    (work / "tests").symlink_to(REPO / "tests", target_is_directory=True)
    base = (REPO / "pyproject.toml").read_text()
    base = re.sub(r"(?ms)^\[tool\.mutmut\].*?(?=^\[|\Z)", "", base)  # a section of the repository's own, if any
    selection = [t for t in _existing(tests) if not any(fnmatch.fnmatch(t, g) for g in skip)]
    for node in deselect:
        selection += ["--deselect", node]
    # the trained fixtures are cached in the repository's pytest cache (same code, same digest)
    extra = ["-p", "no:randomly", "-o", f"cache_dir={REPO / '.pytest_cache'}", "-W", "ignore"]
    (work / "pyproject.toml").write_text(base.rstrip() + "\n\n[tool.mutmut]\n"
                                         f"source_paths = [\"src\"]\n"
                                         f"only_mutate = {_toml_list([source])}\n"
                                         f"pytest_add_cli_args_test_selection = {_toml_list(selection)}\n"
                                         f"pytest_add_cli_args = {_toml_list(extra)}\n"
                                         "process_isolation = \"forkserver\"\n"
                                         "use_git_change_detection = false\n")
    return work


def run_mutmut(work: Path, jobs: int, verbose: bool) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", ADVLAB_QUIET="1",
               ADVLAB_SHARED_DATA=os.environ.get("ADVLAB_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs)]
    out = None if verbose else subprocess.DEVNULL
    return subprocess.call(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)


def _function_of(mutant: str) -> str:
    """``advlab.eval.runner.x_worst_case__mutmut_12`` -> ``worst_case``;
    ``...xǁAttackResultǁ__post_init____mutmut_3`` -> ``AttackResult.__post_init__``."""
    tail = mutant.rpartition(".")[2]
    tail = re.sub(r"__mutmut_\d+$", "", tail)
    if tail.startswith("xǁ"):
        cls, _, meth = tail[2:].partition("ǁ")
        return f"{cls}.{meth}"
    return tail[2:] if tail.startswith("x_") else tail


def _diff_lines(diff: str):
    old = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    new = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return " | ".join(old), " | ".join(new)


def _codes(name: str, work: Path) -> dict:
    meta = work / "mutants" / (MODULES[name][0] + ".meta")
    if not meta.exists():
        raise SystemExit(f"{name}: mutmut left no results ({meta} is absent); rerun with --verbose")
    return json.loads(meta.read_text())["exit_code_by_key"]


def _union(a, b):
    """The verdict of the union of two test selections on one mutant: killed if either killed it."""
    if a in KILLED or b in KILLED:
        return 1
    if a in SURVIVED or b in SURVIVED:
        return 0
    return a


def collect(name: str, work: Path, union_with=()):
    """Per mutant: (mutant name, status, function, old line, new line, diff), read in the work folder
    (with ``union_with``: combined with the verdicts of other runs of the same module)."""
    source = MODULES[name][0]
    codes = _codes(name, work)
    for other in union_with:
        more = _codes(name, Path(other))
        if set(more) != set(codes):
            raise SystemExit(f"{name}: {other} holds other mutants (the source changed between the runs)")
        codes = {k: _union(v, more[k]) for k, v in codes.items()}
    old_cwd = os.getcwd()
    os.chdir(work)
    try:
        from mutmut.configuration import reset_config
        from mutmut.mutation.diff_apply import get_diff_for_mutant

        reset_config()
        rows = []
        for mutant, code in sorted(codes.items(), key=lambda kv: (kv[0].rpartition("__mutmut_")[0],
                                                                  int(kv[0].rpartition("_")[2]))):
            diff = get_diff_for_mutant(mutant, path=source)
            old, new = _diff_lines(diff)
            rows.append((mutant, code, _function_of(mutant), old, new, diff))
        return rows
    finally:
        os.chdir(old_cwd)


def load_equivalent():
    """{(module, function, old, new): reason} from mutation_equivalent.yaml."""
    if not EQUIVALENT.exists():
        return {}
    import yaml

    data = yaml.safe_load(EQUIVALENT.read_text()) or {}
    out = {}
    for module, entries in data.items():
        for e in entries or []:
            out[(module, e["function"], str(e["from"]).strip(), str(e["to"]).strip())] = e["reason"]
    return out


def summarize(name: str, rows, equivalent, show: bool):
    counts = dict(mutants=len(rows), killed=0, survived=0, equivalent=0, no_tests=0, other=0)
    used = set()
    survivors = []
    for mutant, code, fn, old, new, diff in rows:
        key = (name, fn, old, new)
        if code in KILLED:
            counts["killed"] += 1
            if key in equivalent:
                print(f"  note: {mutant} is listed as equivalent but was killed: remove it from the list")
        elif key in equivalent:
            counts["equivalent"] += 1
            used.add(key)
        elif code in SURVIVED:
            counts["survived"] += 1
            survivors.append((mutant, fn, diff))
        elif code in NO_TESTS:
            counts["no_tests"] += 1
            survivors.append((mutant + " (no test reaches it)", fn, diff))
        else:
            counts["other"] += 1
            survivors.append((mutant + f" (exit code {code})", fn, diff))
    denom = counts["mutants"] - counts["equivalent"]
    counts["score"] = counts["killed"] / denom if denom else float("nan")
    if show:
        for mutant, fn, diff in survivors:
            print(f"\n--- survivor {mutant} in {fn}")
            print("\n".join(diff.splitlines()[2:]))
    stale = [k for k in equivalent if k[0] == name and k not in used]
    for k in stale:
        print(f"  note: equivalent entry {k[1]}: {k[2]!r} -> {k[3]!r} matched no surviving mutant")
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--module", action="append", choices=sorted(MODULES), help="run only this module (repeatable)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="parallel mutant workers")
    p.add_argument("--survivors", action="store_true", help="print the diff of every surviving mutant")
    p.add_argument("--skip-tests", action="append", default=[], metavar="GLOB",
                   help="leave these test files out (e.g. 'tests/test_core_*' to measure the tests without them)")
    p.add_argument("--union-with", action="append", default=[], metavar="DIR",
                   help="also count the verdicts of another run's work folder (a copy of mutants/<module> made on other "
                        "test files): a mutant is killed if either run killed it, as the union of the selections would")
    p.add_argument("--tag", help="work in mutants/<module>-TAG, so two runs of a module can coexist")
    p.add_argument("--report-only", action="store_true", help="read the last run's results, run nothing")
    p.add_argument("--json", type=Path, help="also write the table to this file")
    p.add_argument("--verbose", action="store_true", help="show mutmut's own output")
    a = p.parse_args(argv)
    names = a.module or list(MODULES)
    equivalent = load_equivalent()
    table = {}
    for name in names:
        work = WORK / (name + (f"-{a.tag}" if a.tag else ""))
        t0 = time.perf_counter()
        if not a.report_only:
            work = prepare(name, a.skip_tests, work)
            print(f"{name}: running mutmut on {MODULES[name][0]} ...", flush=True)
            rc = run_mutmut(work, a.jobs, a.verbose)
            if rc != 0:
                print(f"{name}: mutmut exited with {rc} (rerun with --verbose)", flush=True)
        counts = summarize(name, collect(name, work, a.union_with), equivalent, a.survivors)
        counts["seconds"] = round(time.perf_counter() - t0, 1)
        table[name] = counts
        print(f"{name}: {counts}", flush=True)
    print()
    head = f"{'module':<12} {'mutants':>7} {'killed':>7} {'survived':>8} {'equivalent':>10} {'no tests':>8} {'score':>7}"
    print(head)
    print("-" * len(head))
    for name, c in table.items():
        print(f"{name:<12} {c['mutants']:>7} {c['killed']:>7} {c['survived']:>8} {c['equivalent']:>10} "
              f"{c['no_tests']:>8} {100 * c['score']:>6.1f}%")
    if a.json:
        a.json.write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
