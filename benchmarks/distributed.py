"""Images per second with 1 and with 2 processes under torchrun (gloo on the CPU, nccl on GPUs):
one epoch of LeNet-5 training through ``advlab.train.fit`` (DDP, the same global batch: each of
W processes takes batch/W) and a seeded PGD run through ``Attack.run`` (sharded by batches,
gathered once). Not a timed test: it prints a table. With 2 processes it also prints the bytes
rank 0's gather sends per sample it attacked (what ``all_gather_object`` pickles): for the PGD
run, and for an FGSM run over ``--gather-n`` labels at ``--gather-batch`` (tiny 2x2 images, so
only the per-sample results count).

    python benchmarks/distributed.py [--data-root ../shared/data/mnist-10k] [--nprocs 1,2] [--threads 1]

Without the MNIST files it uses the embedded 8x8 digits. Each process uses --threads CPU threads,
so 2 processes use twice the cores of 1: on a machine with 2 shared cores expect well under 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("ADVLAB_QUIET", "1")


def worker(args) -> None:
    """One rank of a measured run (started by torchrun)."""
    from advlab import distributed
    from advlab.attacks import FGSM, PGD
    from advlab.data import load_dataset
    from advlab.models import build_model
    from advlab.train import fit

    torch.set_num_threads(args.threads)
    dev = distributed.init()
    if dev.type == "cpu" or args.device == "cpu":
        dev = torch.device("cpu")
    root = Path(args.data_root)
    if (root / "train-images-idx3-ubyte.gz").is_file():
        train, test = load_dataset("mnist", root, "train"), load_dataset("mnist", root, "test")
        shape = (1, 28, 28)
    else:
        train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
        shape = (1, 8, 8)
    world = distributed.world_size()
    model = build_model("lenet5", 10, shape, seed=0).to(dev)
    # warm-up step (DDP construction, first allreduce, allocator), then one timed epoch
    fit(model, train, epochs=1, lr=1e-3, batch_size=max(1, args.batch_size // world), seed=1, progress=False)
    distributed.barrier()
    t0 = time.perf_counter()
    fit(model, train, epochs=args.epochs, lr=1e-3, batch_size=max(1, args.batch_size // world), seed=0,
        progress=False)
    distributed.barrier()
    train_s = time.perf_counter() - t0
    n = min(args.n, len(test.labels))
    x, y = test.images[:n], test.labels[:n]
    atk = PGD(model, eps=0.3, alpha=0.01, steps=args.steps, seed=0)
    atk.run((x[: args.attack_batch], y[: args.attack_batch]), batch_size=args.attack_batch, progress=False)
    distributed.barrier()
    sent = []  # bytes this rank's gather pickles (what all_gather_object sends)
    gather = distributed.all_gather_object

    def counting_gather(obj):
        sent.append(len(pickle.dumps(obj)))
        return gather(obj)
    distributed.all_gather_object = counting_gather
    t0 = time.perf_counter()
    res = atk.run((x, y), batch_size=args.attack_batch, progress=False)
    distributed.barrier()
    pgd_s = time.perf_counter() - t0
    distributed.all_gather_object = gather
    # the gather alone on a large label set: FGSM on --gather-n labels (tiny images), rank 0's bytes
    big = min(args.gather_n, 10 ** 7)
    gx = torch.rand(big, 1, 2, 2)
    gy = torch.randint(0, 10, (big,))
    tiny = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 10)).to(dev)
    sent_big = []

    def counting_gather_big(obj):
        sent_big.append(len(pickle.dumps(obj)))
        return gather(obj)
    distributed.all_gather_object = counting_gather_big
    FGSM(tiny, eps=0.1).run((gx, gy), batch_size=args.gather_batch, progress=False)
    distributed.all_gather_object = gather
    own = sum(min(args.gather_batch, big - b * args.gather_batch)
              for b in range(distributed.rank(), -(-big // args.gather_batch), world))
    if distributed.is_main():
        print("RESULT " + json.dumps({"world": world, "train_images_per_s": args.epochs * len(train.labels) / train_s,
                                      "pgd_images_per_s": n / pgd_s, "pgd_robust_acc": res.robust_accuracy,
                                      "train_n": len(train.labels), "pgd_n": n, "device": str(dev),
                                      "pgd_sent_bytes": sum(sent), "gather_sent_bytes": sum(sent_big),
                                      "gather_own": own}), flush=True)
    distributed.shutdown()


def main(argv=None) -> None:
    here = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(here.parent / "shared" / "data" / "mnist-10k"))
    p.add_argument("--nprocs", default="1,2", help="process counts to compare")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--batch-size", type=int, default=64, help="global training batch")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--n", type=int, default=1024, help="images attacked")
    p.add_argument("--steps", type=int, default=20, help="PGD steps")
    p.add_argument("--attack-batch", type=int, default=128)
    p.add_argument("--gather-n", type=int, default=50_000, help="labels of the gather-size measurement")
    p.add_argument("--gather-batch", type=int, default=256, help="batch of the gather-size measurement")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--nprocs")]
    for w in [int(v) for v in args.nprocs.split(",")]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={w}",
               str(Path(__file__).resolve()), "--worker", *passthrough]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [s for s in out.stdout.splitlines() if s.startswith("RESULT ")]
        if out.returncode or not line:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"the run with {w} processes failed")
        rows.append(json.loads(line[0][7:]))
    base = rows[0]
    print(f"LeNet-5, {base['train_n']} training images x {args.epochs} epoch(s), global batch {args.batch_size}; "
          f"PGD-{args.steps} on {base['pgd_n']} images, batch {args.attack_batch}; {args.threads} thread(s) per "
          f"process, {base['device']}")
    print(f"{'processes':>9} | {'train img/s':>11} | {'speed-up':>8} | {'PGD img/s':>9} | {'speed-up':>8} | "
          f"PGD robust acc | gather sent by rank 0, B/sample (PGD run; {args.gather_n} labels at batch "
          f"{args.gather_batch})")
    for r in rows:
        pgd_own = -(-r["pgd_n"] // r["world"])
        g = f"{r['pgd_sent_bytes'] / pgd_own:.0f}; {r['gather_sent_bytes'] / r['gather_own']:.0f}" \
            if r["world"] > 1 else "-"
        print(f"{r['world']:>9} | {r['train_images_per_s']:>11.0f} | "
              f"{r['train_images_per_s'] / base['train_images_per_s']:>7.2f}x | {r['pgd_images_per_s']:>9.1f} | "
              f"{r['pgd_images_per_s'] / base['pgd_images_per_s']:>7.2f}x | {r['pgd_robust_acc']:>14.4f} | {g}")


if __name__ == "__main__":
    main()
