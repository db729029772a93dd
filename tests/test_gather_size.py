"""The sharded gather sends each sample's own results only: a batch's entry holds copies of its
samples, never views of the whole stream (a tensor pickles its whole storage, so a batch's slice
of 50k labels would send all 50k labels once per batch). Measured in one process: the run thinks
it is rank 0 of 2, and the collective is replaced by one that pickles what it would send (as
``torch.distributed.all_gather_object`` does) and hands back rank 0's part plus a stand-in for
rank 1's."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

import advlab.attacks.base as base
from advlab import distributed
from advlab.attacks import FGSM

pytestmark = pytest.mark.usefixtures("one_thread")

N, BATCH = 50_000, 256


@pytest.fixture
def sent(monkeypatch):
    """Run as rank 0 of 2; returns the list of pickled sizes of what each collective sends."""
    sizes = []

    def fake_all_gather_object(obj):
        sizes.append(len(pickle.dumps(obj)))
        # rank 1 holds the odd batches: rank 0's entries moved one position on stand in for them
        return [obj, {k + 1: v for k, v in obj.items()}]

    monkeypatch.setattr(base, "run_world", lambda shard: (2, 0))
    monkeypatch.setattr(distributed, "all_gather_object", fake_all_gather_object)
    return sizes


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()


@pytest.mark.parametrize("labels_dtype", [torch.long, torch.int32])
def test_gather_sends_under_100_bytes_per_sample_for_50k_labels(sent, labels_dtype):
    x = torch.rand(N, 1, 4, 4)
    y = torch.randint(0, 10, (N,), dtype=labels_dtype)
    res = FGSM(_model(), eps=0.1).run((x, y), batch_size=BATCH, progress=False)
    assert len(sent) == 1
    rank0 = len(range(0, (N + BATCH - 1) // BATCH, 2)) * BATCH  # samples rank 0 attacked (98 batches)
    per_sample = sent[0] / rank0
    # before: each batch pickled the whole 50k-label storage (400 kB per batch, ~1.6 kB/sample)
    assert per_sample < 100, f"{per_sample:.0f} bytes per sample sent"
    assert res.labels.dtype == torch.long


def test_gather_with_targets_and_kept_adversarials_sends_only_own_rows(sent):
    x = torch.rand(4096, 1, 4, 4)
    y = torch.randint(0, 10, (4096,))
    t = (y + 1) % 10
    FGSM(_model(), eps=0.1).run((x, y), batch_size=BATCH, targets=t, keep_adversarials=True, progress=False)
    rank0 = 8 * BATCH
    # per sample: the 16 float32 pixels of the adversarial (64 B) plus the per-sample results
    assert sent[0] / rank0 < 64 + 100


def test_compact_copies_views_only():
    whole = torch.arange(10_000)
    view = whole[256:512]
    c = distributed.compact({"a": view, "b": [view[:3], (whole,)], "n": 1})
    assert torch.equal(c["a"], view) and c["a"].untyped_storage().nbytes() == 256 * 8
    assert c["b"][0].untyped_storage().nbytes() == 3 * 8
    assert c["b"][1][0].data_ptr() == whole.data_ptr()  # owns its storage exactly: not copied
    assert c["n"] == 1
    assert len(pickle.dumps(c["a"])) < len(pickle.dumps(view)) / 10


def test_gather_indexed_sends_compact_items(monkeypatch):
    sizes = []

    def fake(obj):
        sizes.append(len(pickle.dumps(obj)))
        return [obj]

    monkeypatch.setattr(distributed, "all_gather_object", fake)
    whole = torch.arange(100_000)
    out = distributed.gather_indexed({0: {"y": whole[:10]}, 1: {"y": whole[10:20]}})
    assert torch.equal(torch.cat([e["y"] for e in out]), whole[:20])
    assert sizes[0] < 2_000
