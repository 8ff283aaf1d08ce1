#!/bin/bash
# The fourteenth session's runbook (docs/notes/gpu-runbook.md): issue 14's warp-specialized prefill launch
# through 2-d descriptors with one base pointer for every program (runbook13 found per-program bases read
# wrong rows under Triton 3.6's partitioned loop, and 4-d descriptors neither compiled nor finished:
# ws_bisect.py). Everything goes into one tarball under $OUT.
# On the device, from the repository root, after the wheels prefix of the runbook:
#     bash benchmarks/results/gpu/runbook14.sh [0|1|2 ...]   (default: 0 1 2; about 8 minutes in all)
R=/tmp/runbook14
mkdir -p "$R"
save() { tar czf "$OUT/runbook14.tgz" -C /tmp runbook14; }
nvidia-smi --query-gpu=name,driver_version --format=csv > "$R/gpu.txt"
cat "$R/gpu.txt"
steps=${*:-0 1 2}
for step in $steps; do
  case $step in
    0)  # does the "ws" launch finish, and right? (ws_bisect.py, which found the descriptor forms that work,
        # ran on 6b148aa: h100/prefill-ws/README.md)
      for m in "ours 1 128 2" "ours 0 128 2" "ours 1 128 2 lens"; do
        timeout 40 python3 benchmarks/results/gpu/prefill-ws/ws_probe.py $m 2>&1 | tail -2
        echo "[$m] rc=${PIPESTATUS[0]}"
      done | tee "$R/ws-probe.txt"
      if grep -q "rc=124" "$R/ws-probe.txt"; then save; echo "the ws launch does not finish: stop"; exit 1; fi
      ;;
    1)  # the warp-specialized launch against the oracle, then a first speed reading
      timeout 150 python3 -m pytest -q -n 8 -p no:cacheprovider -p no:benchmark tests/test_prefill.py \
        -k "warp or tma or flatten" 2>&1 | tail -6 | tee "$R/pytest-prefill-ws.txt"
      if ! grep -q " passed" "$R/pytest-prefill-ws.txt" || grep -q "failed" "$R/pytest-prefill-ws.txt"; then
        save; echo "the ws launch fails its tests: no grid"; exit 1
      fi
      timeout 90 python3 benchmarks/results/gpu/prefill-ws/ws_probe.py time 2>&1 | tail -8 | tee "$R/ws-time.txt"
      ;;
    2)  # issue 14: every prefill bucket, the "-ws" launches among the candidates
      timeout 330 python3 -m attnforge.cli tune --preset prefill-grid --full --time-budget 240 --out "$R" 2>&1 \
        | tail -34
      ;;
  esac
  save
done
ls -la "$R"
