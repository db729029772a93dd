"""``advlab defend NAME``: build a defended model from a trained checkpoint and write its report."""

from __future__ import annotations

from .._util import AdvlabError, unknown_name
from ..data import load_dataset
from ..train import read_checkpoint

DEFENSES = {"msvdd": "M-SVDD-D: one SVDD per class plus an adversarial class (K-A3 paper, section 4)"}


def run_defense(args):
    """Dispatch on ``args.defense``; returns the saved Report."""
    if args.defense not in DEFENSES:
        raise unknown_name("defense", args.defense, DEFENSES)
    meta = read_checkpoint(args.checkpoint)["metadata"]
    dataset = args.dataset or meta.get("dataset")
    if not dataset:
        raise AdvlabError("--dataset is required (the checkpoint does not name one)")
    train = load_dataset(dataset, root=args.root, split="train")
    test = load_dataset(dataset, root=args.root, split="test")
    if args.defense == "msvdd":
        from .repro_msvdd import defend_cli

        opts = {} if args.epochs is None else {"svdd_epochs": args.epochs}
        return defend_cli(args.checkpoint, train, test, args.out, n=args.n, seed=args.seed, device=args.device,
                          progress=not args.quiet, **opts)
    raise AdvlabError(f"defense {args.defense!r} has no runner")  # unreachable: DEFENSES is checked above
