#!/usr/bin/env bash
# One run on a machine with CUDA: the CUDA tests, then the attack and battery benchmarks at sizes that
# fit a few minutes each, printing their ratios (our time over a plain forward+backward; ours over
# the other library where it is installed). Not a test: nothing here asserts a timing.
#
#   bash benchmarks/gpu.sh                        # data in ../shared/data (mnist-10k)
#   DATA=/path/to/mnist-10k bash benchmarks/gpu.sh
#   OUT=/tmp/gpu bash benchmarks/gpu.sh          # where the logs go (default: gpu-logs/)
#
# Needs an installed advlab (pip install -e ".[test]"); torchattacks is used when importable
# (pip install --no-deps torchattacks). Each step's output goes to $OUT/<step>.log and to the screen.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data/mnist-10k}"
OUT="${OUT:-gpu-logs}"
mkdir -p "$OUT"

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "benchmarks/gpu.sh: no CUDA device visible to torch; nothing to run" >&2
    exit 2
fi
python -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)" \
    | tee "$OUT/device.log"

status=0
step() {  # step NAME COMMAND...: run, log, remember a failure without stopping the others
    local name="$1"; shift
    echo; echo "=== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc, $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || status=1
}

# 1. the tests that need a CUDA device (they skip on a CPU machine), then the device-independent
#    attack tests once more with the GPU visible
step cuda-tests python -m pytest -q -p no:randomly -k "cuda or device" tests/
# 2. every attack against a plain forward+backward on the GPU (LeNet-5, 3 training epochs first)
step attacks python benchmarks/attacks.py --device cuda --data-root "$DATA" --n 2048 --threads 1
# 3. FAB-T L-inf / L2 against the plain loop (and torchattacks' FAB when importable)
step fab python benchmarks/fab.py --device cuda --data-root "$DATA" --n 1024 --others torchattacks
# 4. the evaluate battery beside torchattacks' AutoAttack at the reference's budgets (trains the
#    adversarially trained LeNet-5 first: about 20 epochs of PGD-10 on 8000 images)
step evaluate python benchmarks/evaluate.py --device cuda --data-root "$DATA" --n 1000 --ta-steps 100 --rounds 1 \
    --save-checkpoint "$OUT/lenet_at.pt"
step evaluate-l2 python benchmarks/evaluate.py --device cuda --data-root "$DATA" --checkpoint "$OUT/lenet_at.pt" \
    --norm 2 --n 1000 --ta-steps 100 --rounds 1

echo
echo "logs in $OUT/; exit $status"
exit $status
