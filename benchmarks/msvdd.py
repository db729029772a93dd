"""Inference throughput of an M-SVDD-D defended model beside the plain model it was built from
(images/second for ``predict``), plus the time to fit the defense.

    python benchmarks/msvdd.py [--model mnist-fc1] [--projections 512] [--data-root ../shared/data/mnist-10k]

Without the mnist-10k folder it falls back to the embedded 8x8 digits.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("ADVLAB_QUIET", "1")

from advlab.data import load_dataset  # noqa: E402
from advlab.defenses.msvdd import MSVDDDefense  # noqa: E402
from advlab.models import build_model  # noqa: E402
from advlab.train import fit, predict  # noqa: E402


def images_per_second(fn, x: torch.Tensor, batch_size: int, repeats: int) -> float:
    best = float("inf")
    fn(x[:batch_size])  # warm-up (also fills the SVDD layer's cache)
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, x.shape[0], batch_size):
            fn(x[i: i + batch_size])
        if x.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return x.shape[0] / best


def main():
    here = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(here.parent / "shared" / "data" / "mnist-10k"))
    p.add_argument("--model", default="mnist-fc1")
    p.add_argument("--projections", type=int, default=512)
    p.add_argument("--epochs", type=int, default=3, help="training epochs of the plain model")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    if Path(args.data_root, "train-images-idx3-ubyte.gz").is_file():
        train, test, name = (load_dataset("mnist", args.data_root, "train"),
                             load_dataset("mnist", args.data_root, "test"), "mnist-10k")
    else:
        train, test, name = load_dataset("digits", split="train"), load_dataset("digits", split="test"), "digits"
    dev = torch.device(args.device)
    model = build_model(args.model, 10, train.in_shape, seed=0).to(dev)
    fit(model, train, epochs=args.epochs, lr=3e-3, batch_size=64, schedule="onecycle", progress=False)
    t0 = time.perf_counter()
    defense = MSVDDDefense.fit(model, train, projections=args.projections, svdd_epochs=2, positive_epochs=2,
                               finetune_epochs=1, progress=False)
    t_fit = time.perf_counter() - t0
    n_epochs = len(defense.history["positive"]) + len(defense.history["joint"])
    x = test.images.to(dev)
    plain = images_per_second(lambda xb: predict(model, xb, args.batch_size), x, args.batch_size, args.repeats)
    defended = images_per_second(lambda xb: defense.predict(xb, args.batch_size), x, args.batch_size, args.repeats)
    feat = defense.feature_dim
    print(f"{args.model} on {name} ({len(test)} test images), M={args.projections}, feature dim {feat}, "
          f"batch {args.batch_size}, {dev}, {torch.get_num_threads()} threads")
    print(f"  plain model      predict: {plain:10.0f} images/s")
    print(f"  M-SVDD-D defense predict: {defended:10.0f} images/s  ({defended / plain:.2f}x the plain model)")
    print(f"  fit: {defense.history['svdd_seconds']:.1f} s for {n_epochs} SVDD epochs on {len(train)} images "
          f"+ {defense.history['finetune_seconds']:.1f} s for 1 fine-tuning epoch (total {t_fit:.1f} s)")


if __name__ == "__main__":
    main()
