#!/bin/bash
# The fifteenth session's second runbook (docs/notes/gpu-runbook.md), issue 14:
#   0  FA3's ping-pong in the scratch Gluon kernel (benchmarks/results/gpu/prefill-gluon/fa_gluon.py, "-pp":
#      the two consumer warpgroups issue their products in turn, each block's PV deferred into the next
#      block's turn) checked under `timeout` (a wrong barrier protocol deadlocks), then timed with the split
#      variants against SDPA and the stored launch;
#   1  the library's Gluon launch (kernels/prefill_gluon.py) against the oracle: tests/test_prefill_gluon.py;
#   2  the prefill grid with the Gluon schedules among the candidates (prefill-gluon/grid_gluon.py).
# One tarball under $OUT. On the device, from the repository root, after the wheels prefix of the runbook:
#     bash benchmarks/results/gpu/runbook16.sh [0|1|2 ...]   (default: 0 1 2; about 8 minutes)
R=/tmp/runbook16
mkdir -p "$R"
save() { tar czf "$OUT/runbook16.tgz" -C /tmp runbook16; }
nvidia-smi --query-gpu=name,driver_version --format=csv > "$R/gpu.txt"
cat "$R/gpu.txt"
for step in ${*:-0 1 2}; do
  case $step in
    0)
      passed=""
      for v in n128-st2-pp n128-st3-pp n128-st3-split n128-st2-split; do
        timeout 90 python3 benchmarks/results/gpu/prefill-gluon/fa_gluon.py check $v > "$R/check-$v.txt" 2>&1
        rc=$?
        echo "[$v] rc=$rc" | tee -a "$R/check.txt"
        tail -2 "$R/check-$v.txt"
        if [ $rc -eq 0 ]; then passed="$passed $v"; fi
        save
      done
      if [ -n "$passed" ]; then
        timeout 200 python3 benchmarks/results/gpu/prefill-gluon/fa_gluon.py time "$R/gluon-time.json" $passed \
          2>&1 | tail -40 | tee "$R/gluon-time.txt"
      fi
      ;;
    1)
      timeout 240 python3 -m pytest -q -n 8 -p no:cacheprovider -p no:benchmark tests/test_prefill_gluon.py \
        2>&1 | tail -25 | tee "$R/pytest-prefill-gluon.txt"
      if ! grep -q " passed" "$R/pytest-prefill-gluon.txt" || grep -qE "failed|error" "$R/pytest-prefill-gluon.txt"
      then
        save; echo "the Gluon launch fails its tests: no grid"; exit 1
      fi
      ;;
    2)
      timeout 300 python3 benchmarks/results/gpu/prefill-gluon/grid_gluon.py "$R" 2>&1 | tail -30
      ;;
  esac
  save
done
ls -la "$R"
