"""Time the VIB bound (nearest other-class neighbour, :mod:`advlab.metrics.bound`) on Fashion-MNIST's
full training set and on mnist-10k, with its peak memory, and cross-check it against scikit-learn's
NearestNeighbors (manhattan, brute force) and a one-shot torch ``cdist`` on a subset.

    python benchmarks/bound.py --data-root /work/shared/data [--threads 1] [--subset 2000] [--device cpu]

Peak memory: on CPU, the process's resident set is sampled every 5 ms during the search (torch's
allocations are invisible to tracemalloc) and reported as the peak above the level before it
(the data already loaded), beside ``ru_maxrss``; on CUDA, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch

from advlab._util import PeakRSS
from advlab.data import load_dataset, shared_data_root
from advlab.metrics.bound import bound_statistics, brute_force_nearest_other_class, nearest_other_class


def measure(x, y, device: str, **kw):
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    with PeakRSS() as m:
        res = nearest_other_class(x, y, device=dev, **kw)
    out = {"n": int(y.numel()), "seconds": res.seconds, "method": res.method, "chunk_rows": res.chunk_size,
           "tile_MiB": res.tile_bytes / 2 ** 20, "exact_pairs": res.exact_pairs,
           "exact_fraction_of_all_pairs": res.exact_pairs / float(y.numel()) ** 2,
           "bound_pairs": {str(k): v for k, v in res.bound_pairs.items()},
           "rss_before_MiB": m.base / 2 ** 20, "rss_peak_MiB": m.peak / 2 ** 20,
           "rss_peak_above_before_MiB": (m.peak - m.base) / 2 ** 20,
           "ru_maxrss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "full_NxN_float32_would_be_MiB": 4.0 * float(y.numel()) ** 2 / 2 ** 20}
    if dev.type == "cuda":
        out["cuda_peak_above_before_MiB"] = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20
    return res, out


def sklearn_check(x, y, dist_ours: torch.Tensor) -> dict:
    """Nearest other-class neighbour by scikit-learn (manhattan, brute), one fit per class."""
    from sklearn.neighbors import NearestNeighbors

    xf = x.flatten(1).double().numpy()
    yn = y.numpy()
    d = np.empty(len(yn))
    t0 = time.perf_counter()
    for c in np.unique(yn):
        q, r = yn == c, yn != c
        nn = NearestNeighbors(n_neighbors=1, metric="manhattan", algorithm="brute").fit(xf[r])
        d[q] = nn.kneighbors(xf[q])[0][:, 0]
    d /= xf.shape[1]
    diff = np.abs(d - dist_ours.double().numpy())
    return {"seconds": time.perf_counter() - t0, "max_abs_diff": float(diff.max()),
            "max_rel_diff": float((diff / np.maximum(d, 1e-12)).max())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--subset", type=int, default=2000, help="images for the brute-force / scikit-learn cross-check")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-tile-mb", type=float, default=64.0)
    ap.add_argument("--datasets", default="fashion-mnist,mnist")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    root = shared_data_root(a.data_root)
    folders = {"mnist": "mnist-10k", "fashion-mnist": "fashion-mnist"}
    results = {"threads": torch.get_num_threads(), "device": a.device, "torch": torch.__version__}
    for name in a.datasets.split(","):
        tr = load_dataset(name, root / folders[name], "train")
        x, y = tr.images, tr.labels
        print(f"== {name}: {len(y)} training images {tuple(x.shape[1:])}", flush=True)
        res, out = measure(x, y, a.device, max_tile_mb=a.max_tile_mb)
        print(f"   full set: {out['seconds']:.1f} s, peak RSS +{out['rss_peak_above_before_MiB']:.0f} MiB above the "
              f"{out['rss_before_MiB']:.0f} MiB before (an N x N float32 matrix would be "
              f"{out['full_NxN_float32_would_be_MiB']:.0f} MiB); tile {out['tile_MiB']:.0f} MiB, "
              f"{out['exact_fraction_of_all_pairs']:.4%} of the pairs computed in full", flush=True)
        out["statistics"] = bound_statistics(res.distance)
        for row in out["statistics"]:
            print(f"   k={row['k']:<4g} sigma min {row['min']:.4f} mean {row['mean']:.4f} max {row['max']:.4f}")
        sub = tr.subset(min(a.subset, len(y)), seed=0)
        xs, ys = sub.images, sub.labels
        t0 = time.perf_counter()
        bd, bi = brute_force_nearest_other_class(xs, ys)
        t_brute = time.perf_counter() - t0
        for method in ("pruned", "brute"):
            r = nearest_other_class(xs, ys, method=method, device=a.device, max_tile_mb=4)
            same = r.index == bi
            ties = (~same) & (r.distance == bd)
            out[f"subset_{method}_vs_one_shot_cdist"] = {
                "n": len(ys), "max_abs_diff": float((r.distance - bd).abs().max()),
                "index_differs": int((~same).sum()), "of_which_equal_distance": int(ties.sum()),
                "seconds": r.seconds, "one_shot_cdist_seconds": t_brute}
        out["subset_sklearn"] = sklearn_check(xs, ys, nearest_other_class(xs, ys, device=a.device).distance)
        print(f"   subset of {len(ys)}: chunked pruned vs one-shot cdist max |diff| "
              f"{out['subset_pruned_vs_one_shot_cdist']['max_abs_diff']:.2e}, chunked brute "
              f"{out['subset_brute_vs_one_shot_cdist']['max_abs_diff']:.2e}; vs scikit-learn (float64) max |diff| "
              f"{out['subset_sklearn']['max_abs_diff']:.2e} (relative {out['subset_sklearn']['max_rel_diff']:.2e})",
              flush=True)
        results[name] = out
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
