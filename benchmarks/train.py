"""Training throughput: one epoch of LeNet-5 on mnist-10k through advlab.train.fit, beside a plain
hand-written PyTorch loop over the same data (the ratio is our overhead).

    python benchmarks/train.py [--data-root ../shared/data/mnist-10k] [--model lenet5] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("ADVLAB_QUIET", "1")

from advlab.data import load_dataset  # noqa: E402
from advlab.models import build_model  # noqa: E402
from advlab.train import fit  # noqa: E402


def plain_epoch(model, x, y, batch_size, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(x.shape[0], generator=g)
    model.train()
    t0 = time.perf_counter()
    for i in range(0, x.shape[0], batch_size):
        idx = perm[i: i + batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main():
    here = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(here.parent / "shared" / "data" / "mnist-10k"))
    p.add_argument("--model", default="lenet5")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    train = load_dataset("mnist", args.data_root, "train")
    dev = torch.device(args.device)
    n = len(train)
    print(f"{args.model} on mnist-10k train ({n} images), batch {args.batch_size}, {dev}, "
          f"{torch.get_num_threads()} threads")
    best_fit, best_plain = float("inf"), float("inf")
    for r in range(args.repeats):
        m = build_model(args.model, 10, (1, 28, 28), seed=r).to(dev)
        h = fit(m, train, epochs=1, lr=1e-3, batch_size=args.batch_size, seed=r, device=dev, progress=False)
        best_fit = min(best_fit, h.epochs[0]["seconds"])
        m = build_model(args.model, 10, (1, 28, 28), seed=r).to(dev)
        best_plain = min(best_plain, plain_epoch(m, train.images.to(dev), train.labels.to(dev), args.batch_size, 1e-3))
    print(f"advlab.train.fit : {n / best_fit:10.0f} images/s  ({best_fit:.2f} s/epoch)")
    print(f"plain torch loop : {n / best_plain:10.0f} images/s  ({best_plain:.2f} s/epoch)")
    print(f"ratio fit/plain  : {best_fit / best_plain:10.2f}")


if __name__ == "__main__":
    main()
