"""Small models and data shared by the attack tests."""

import torch
from torch import nn


def tiny_model(channels: int = 1, classes: int = 5, seed: int = 0, dtype=torch.float32) -> nn.Module:
    """A small random CNN that takes any image size; BatchNorm and Dropout make train/eval differ."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.5), nn.Linear(16, classes))
    return m.to(dtype).eval()


def images(n, c=1, h=8, w=8, seed=0, dtype=torch.float32):
    """Random images with some pixels exactly 0 and 1, where box constraints bite."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, h, w, generator=g, dtype=dtype) * 0.6 + 0.5).clamp(0, 1)


def labels(n, classes=5, seed=1):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def junk(n: int, seed: int = 0) -> bytes:
    """``n`` fixed pseudo-random bytes: a corrupt file that is the same every run (``os.urandom``
    starts with pickle's PROTO byte one run in 256, which once made a case flaky)."""
    import random

    return random.Random(seed).randbytes(n)


def catalogue_params(cases: dict) -> list:
    """One ``pytest.param`` per named case of a bad-input catalogue (``{id: case}``, each case with
    an ``xfail`` reason or None), sorted by id; a case with a reason is a strict xfail."""
    import pytest

    return [pytest.param(cid, id=cid, marks=[pytest.mark.xfail(strict=True, reason=cases[cid].xfail)]
                         if cases[cid].xfail else []) for cid in sorted(cases)]


def check_api_case(case, folder, leftovers, one_line: bool = True) -> None:
    """One Python-API case of a bad-input catalogue: one AdvlabError whose message matches the
    case's needle (on one line with ``one_line``: a few library messages quote a YAML error or list
    the mirrors tried, which the CLI folds onto its one line), no traceback, no file left in
    ``folder``, then the case's own ``after`` check."""
    import re

    import pytest

    from advlab._util import AdvlabError

    with pytest.raises(AdvlabError) as info:
        case.run(folder)
    msg = str(info.value)
    assert re.search(case.match, msg, re.IGNORECASE | re.DOTALL), \
        f"message does not name the problem ({case.match!r}): {msg}"
    assert "Traceback" not in msg and not (one_line and "\n" in msg), msg
    assert not leftovers(folder), f"temporary files left behind: {leftovers(folder)}"
    if case.after is not None:
        case.after(folder)


def check_cli_case(case, rc: int, err: str, folder, leftovers) -> None:
    """One command-line case: exit code 2, one ``advlab: error:`` line matching the needle, no
    traceback, no file left, then the case's own ``after`` check."""
    import re

    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"exit code {rc}: {err}"
    assert len(lines) == 1 and lines[0].startswith("advlab: error: "), err
    assert re.search(case.match, lines[0], re.IGNORECASE), f"message does not name the problem ({case.match!r}): {lines[0]}"
    assert not leftovers(folder), f"temporary files left behind: {leftovers(folder)}"
    if case.after is not None:
        case.after(folder)

