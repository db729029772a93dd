"""What K-A3's CW-SSIM term costs, and the part of it no exact implementation can avoid.

Prints, for a batch of 28x28 images and MNIST-FC1 (or ``--model``), in units of one plain
forward+backward of the model w.r.t. the input (the unit of ``benchmarks/attacks.py``):

- ``score + backward``: ``CWSSIM.score`` against a fixed reference and its gradient, which is
  what K-A3 adds to every step;
- ``transforms only``: the Fourier transforms that score makes and nothing else, at the same
  shapes and dtype: the image's spectrum, one inverse transform per level of its O complex bands,
  their adjoint forward transforms in the backward, and the final inverse. Any exact CW-SSIM on
  this pyramid computes the band coefficients at every position (every valid window covers them)
  and the adjoint of the same linear map, so this is a floor for the term, whatever the window
  sums and element-wise work cost;
- ``K-A3 floor``: 1 (the model's own forward+backward) + the transforms, the least a K-A3 step
  with this similarity term can cost per sample-step on this machine.

    python benchmarks/cwssim.py                       # MNIST-FC1, 512 images, 2 threads
    python benchmarks/cwssim.py --model lenet5 --n 256

The images are random (uniform in [0, 1]): no time here depends on the pixel values.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from advlab._util import frozen_eval
from advlab.metrics import CWSSIM
from advlab.models import build_model


def median_ms(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mnist-fc1", help="architecture whose forward+backward is the unit")
    p.add_argument("--n", type=int, default=512, help="batch size")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the reference numbers use 2)")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions (the median is shown)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = build_model(args.model, 10, (1, 28, 28), mean=0.1307, std=0.3081).eval()
    x = torch.rand(args.n, 1, 28, 28)
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    labels = torch.randint(0, 10, (args.n,))

    def model_step():
        xr = y.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xr), labels, reduction="sum"), xr)

    metric = CWSSIM()
    ref = metric.reference(x)

    def score_step():
        yr = y.clone().requires_grad_(True)
        torch.autograd.grad(metric.score(ref, yr).sum(), yr)

    plan = metric._plan(y)  # the shapes score transforms at (benchmark only: a private attribute)
    n, c = y.shape[:2]
    bands = [torch.randn(n, c, lv.o, lv.h, lv.w, dtype=torch.complex64) for lv in plan.levels]
    final = torch.randn(n, c, 28, 28, dtype=torch.complex64)

    def transforms():  # what score's forward and backward transform, in the same calls
        torch.fft.fft2(y)
        for b in bands:
            torch.fft.ifft2(b)                  # the bands of the adversarial image
            torch.fft.fft2(b, norm="forward")   # their gradients, back to the frequencies
        torch.fft.ifft2(final, norm="forward")

    with frozen_eval(model):
        unit = median_ms(model_step, args.reps)
    score = median_ms(score_step, args.reps)
    fft = median_ms(transforms, args.reps)
    with frozen_eval(model):
        unit2 = median_ms(model_step, args.reps)
    unit = min(unit, unit2)  # measured before and after: the quieter of the two
    print(f"advlab CW-SSIM, torch {torch.__version__}, {args.threads} threads, {args.n} images 28x28, "
          f"{len(plan.levels)} scales x {plan.levels[0].o} orientations, window {metric.window}")
    print(f"unit = {args.model} forward+backward w.r.t. the input: {unit:.2f} ms")
    print(f"{'':28s}{'ms':>8s}{'ratio':>8s}")
    print(f"{'score + backward':28s}{score:8.2f}{score / unit:8.2f}")
    print(f"{'  transforms only':28s}{fft:8.2f}{fft / unit:8.2f}")
    print(f"{'  the rest (windows, products)':28s}{score - fft:8.2f}{(score - fft) / unit:8.2f}")
    print(f"{'K-A3 floor (1 + transforms)':28s}{'':8s}{1 + fft / unit:8.2f}")


if __name__ == "__main__":
    main()
