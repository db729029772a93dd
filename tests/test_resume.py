"""Resumable reproductions: the stage cache (advlab.eval.stages), and a --quick reproduction
interrupted with SIGINT mid-way, resumed, and compared with an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from advlab._util import AdvlabError
from advlab.eval.stages import STAGE_FOLDER, stage, stage_cache


def test_stage_outside_a_cache_just_calls():
    calls = []
    assert stage("a", lambda: calls.append(1) or 5) == 5
    assert stage("a", lambda: calls.append(1) or 5) == 5
    assert len(calls) == 2


def test_stage_computes_once_then_reads_back(tmp_path):
    calls = []

    def work():
        calls.append(1)
        return {"acc": 0.5, "t": torch.arange(3), "rows": [{"a": 1, "b": None}], "pair": (1, "x")}

    with stage_cache(tmp_path, {"n": 3}) as cache:
        first = stage("exp/seed 0", work)
    with stage_cache(tmp_path, {"n": 3}) as cache:
        second = stage("exp/seed 0", work)
    assert len(calls) == 1 and cache.hits == ["exp/seed 0"]
    assert first["acc"] == second["acc"] and torch.equal(first["t"], second["t"])
    assert second["rows"] == [{"a": 1, "b": None}] and second["pair"] == (1, "x")
    # another spec, another name or --fresh: computed again
    with stage_cache(tmp_path, {"n": 4}):
        stage("exp/seed 0", work)
    with stage_cache(tmp_path, {"n": 3}):
        stage("exp/seed 1", work)
    with stage_cache(tmp_path, {"n": 3}, fresh=True):
        stage("exp/seed 0", work)
    assert len(calls) == 4
    # 'quiet' changes no number: same key
    with stage_cache(tmp_path, {"n": 3, "quiet": True}):
        stage("exp/seed 0", work)
    assert len(calls) == 4


def test_corrupt_stage_is_recomputed_and_partial_files_cleaned(tmp_path):
    with stage_cache(tmp_path, {}) as cache:
        stage("s", lambda: 1)
    path = cache.path("s")
    path.write_bytes(path.read_bytes()[:10])  # truncated
    (path.parent / ".s-abc.pt.x.tmp").write_bytes(b"half")
    with stage_cache(tmp_path, {}) as cache:
        assert stage("s", lambda: 2) == 2
    assert cache.computed == ["s"]
    assert not list(path.parent.glob(".*.tmp"))


def test_stage_refuses_objects_and_keeps_the_callers_rng(tmp_path):
    with stage_cache(tmp_path, {}):
        with pytest.raises(AdvlabError, match="stage value"):
            stage("bad", lambda: {"model": torch.nn.Linear(2, 2)})
    assert not (tmp_path / STAGE_FOLDER).exists() or not list((tmp_path / STAGE_FOLDER).glob("*.pt"))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with stage_cache(tmp_path, {}):
        a = stage("draws", lambda: torch.rand(2))  # the stage's own seeded stream
    assert torch.equal(torch.rand(3), expected)  # the caller's stream is untouched
    with stage_cache(tmp_path / "other", {}):
        b = stage("draws", lambda: torch.rand(2))
    assert torch.equal(a, b)  # same key, same stream, in any process


def _numbers(path: Path):
    """results.json without what changes from run to run (timings, environment, which stages were
    read back)."""
    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items()
                    if k not in ("environment", "timings", "seconds_total", "stages") and "second" not in k.lower()}
        if isinstance(o, list):
            return [strip(v) for v in o]
        return o
    return strip(json.loads(path.read_text()))


def _cmd(out: Path, data_root: Path):
    return [sys.executable, "-m", "advlab.cli", "reproduce", "msvdd", "--quick", "--out", str(out),
            "--data-root", str(data_root), "--quiet"]


def test_interrupted_quick_reproduction_resumes_to_the_same_numbers(tmp_path, mnist_root):
    data_root = mnist_root.parent
    env = {**os.environ, "ADVLAB_QUIET": "1", "OMP_NUM_THREADS": "1"}
    cut = tmp_path / "interrupted"
    # SIGINT back to its default in the child: a shell that starts this suite in the background
    # (``pytest &``) ignores it, and a Python started with SIGINT ignored never raises KeyboardInterrupt
    proc = subprocess.Popen(_cmd(cut, data_root), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stages = cut / STAGE_FOLDER
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not list(stages.glob("*.pt")):
        time.sleep(0.05)
    assert proc.poll() is None, "the reproduction finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "resume" in err and "Traceback" not in err
    assert not (cut / "results.json").exists()  # no partial report
    assert len(list(stages.glob("*.pt"))) == 1 and not list(stages.glob(".*.tmp"))

    resumed = subprocess.run(_cmd(cut, data_root), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    whole = tmp_path / "uninterrupted"
    full = subprocess.run(_cmd(whole, data_root), env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr
    assert _numbers(cut / "results.json") == _numbers(whole / "results.json")
    stages = json.loads((cut / "results.json").read_text())["stages"]
    assert stages["read"] == 1 and stages["computed"] == 1  # the finished stage was read back, not redone
    assert "read back from an earlier run" in (cut / "report.md").read_text()
