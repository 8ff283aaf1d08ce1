#!/bin/bash
# The thirteenth session's runbook (docs/notes/gpu-runbook.md): issue 14's warp-specialized prefill launch on
# the GPU, first alone under `timeout` (a partitioned kernel that deadlocks never returns), then the tests,
# then the prefill grid with it among the candidates. Everything goes into one tarball under $OUT.
# On the device, from the repository root, after the wheels prefix of the runbook:
#     bash benchmarks/results/gpu/runbook13.sh [0|1|2 ...]   (default: 0 1 2; about 8 minutes in all)
R=/tmp/runbook13
mkdir -p "$R"
save() { tar czf "$OUT/runbook13.tgz" -C /tmp runbook13; }
nvidia-smi --query-gpu=name,driver_version --format=csv > "$R/gpu.txt"
cat "$R/gpu.txt"
steps=${*:-0 1 2}
for step in $steps; do
  case $step in
    0)  # does the "ws" launch finish? each case in its own process
      for m in "tutorial" "ours 1 128 2" "ours 0 128 2" "ours 1 64 3" "ours 1 128 2 lens"; do
        timeout 40 python3 benchmarks/results/gpu/prefill-ws/ws_probe.py $m 2>&1 | tail -2
        echo "[$m] rc=${PIPESTATUS[0]}"
      done | tee "$R/ws-probe.txt"
      if grep -q "^\[ours 1 128 2\] rc=124" "$R/ws-probe.txt"; then save; echo "ws launch hangs: stop"; exit 1; fi
      timeout 90 python3 benchmarks/results/gpu/prefill-ws/ws_probe.py time 2>&1 | tail -8 | tee "$R/ws-time.txt"
      ;;
    1)  # the warp-specialized launch against the oracle (partitioned tiles, odd sizes, poisoned padding)
      timeout 150 python3 -m pytest -q -n 8 -p no:cacheprovider -p no:benchmark tests/test_prefill.py \
        -k "warp or tma" 2>&1 | tail -6 | tee "$R/pytest-prefill-ws.txt"
      ;;
    2)  # issue 14: every prefill bucket, the "-ws" launches among the candidates
      timeout 330 python3 -m attnforge.cli tune --preset prefill-grid --full --time-budget 240 --out "$R" 2>&1 \
        | tail -34
      ;;
  esac
  save
done
ls -la "$R"
