#!/bin/bash
# The thirteenth session's runbook (docs/notes/gpu-runbook.md): issue 14's warp-specialized prefill launch on
# the GPU, then the prefill grid with it among the candidates. Everything goes into one tarball under $OUT.
# On the device, from the repository root, after the wheels prefix of the runbook:
#     bash benchmarks/results/gpu/runbook13.sh [0|1 ...]   (default: 0 1; about 6 minutes in all)
R=/tmp/runbook13
mkdir -p "$R"
save() { tar czf "$OUT/runbook13.tgz" -C /tmp runbook13; }
nvidia-smi --query-gpu=name,driver_version --format=csv > "$R/gpu.txt"
cat "$R/gpu.txt"
steps=${*:-0 1}
for step in $steps; do
  case $step in
    0)  # the warp-specialized launch against the oracle (partitioned tiles, odd sizes), the TMA path beside it
      timeout 150 python3 -m pytest -q -n 8 -p no:cacheprovider -p no:benchmark tests/test_prefill.py \
        -k "warp or tma" 2>&1 | tail -6 | tee "$R/pytest-prefill-ws.txt"
      ;;
    1)  # issue 14: every prefill bucket, the "-ws" launches among the candidates
      timeout 400 python3 -m attnforge.cli tune --preset prefill-grid --full --time-budget 300 --out "$R" 2>&1 | tail -34
      ;;
  esac
  save
done
ls -la "$R"
