#!/bin/bash
# Eighteenth session's last call, whichever GPU comes (files under $OUT):
#   on an H200: issue 10's B1 grid with the -tma candidates and the static / ragged targets
#     (runbook22.sh t 1 with a 150 s budget; the H200's 40:8 4k bucket is 1.18x, target 1.2x);
#   on an H100: the swapped eight-row product (gpu/gemv-swap/probe.py check, time: README there). At 16edd12
#     it then ran Qwen3-0.6B's batch-8 step with each shape's fastest set patched in (accel_swap.py, removed
#     since: the library takes those sets by default from 7569ceb on; runbook25.sh q measures the step).
# On the device, from the repository root, after the wheels prefix (PYTHONPATH with $PWD/src):
#     bash benchmarks/results/gpu/runbook24.sh   (about 6 minutes)
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/gpu.txt"
if grep -q H200 "$OUT/gpu.txt"; then
  BUDGET=150 bash benchmarks/results/gpu/runbook22.sh t 1 2>&1 | tail -30  # writes $OUT/runbook22.tgz
  exit 0
fi
cd benchmarks/results/gpu/gemv-swap || exit
timeout 150 python3 probe.py check > "$OUT/swap-check.txt" 2>&1 \
  && timeout 200 python3 probe.py time "$OUT/gemv-swap.json" > "$OUT/swap-time.txt" 2>&1
tail -2 "$OUT/swap-check.txt"
cat "$OUT/swap-time.txt"
