#!/bin/bash
# The fifteenth session's fourth runbook, issue 14: runbook17 found the Gluon launch's split schedules hung
# with q_lens (a program past q_lens waited on key blocks the producer never loads: fixed, the lean count is
# capped by the loaded one); the tests that hung, then the padded targets of the prefill grid.
#     bash benchmarks/results/gpu/runbook18.sh   (about 4 minutes)
R=/tmp/runbook18
mkdir -p "$R"
save() { tar czf "$OUT/runbook18.tgz" -C /tmp runbook18; }
nvidia-smi --query-gpu=name,driver_version --format=csv > "$R/gpu.txt"
cat "$R/gpu.txt"
timeout 110 python3 -m pytest -v -n 8 -p no:cacheprovider -p no:benchmark -o faulthandler_timeout=50 \
  tests/test_prefill_gluon.py -k "lengths or repeats or mask" > "$R/pytest-prefill-gluon.txt" 2>&1
echo "pytest rc=$?" | tee -a "$R/pytest-prefill-gluon.txt"
grep -E "PASSED|FAILED|ERROR|Timeout|passed|failed" "$R/pytest-prefill-gluon.txt" | cut -c1-150 | sort | uniq
save
if grep -q " passed" "$R/pytest-prefill-gluon.txt" && ! grep -qE "FAILED|Timeout" "$R/pytest-prefill-gluon.txt"; then
  timeout 150 python3 benchmarks/results/gpu/prefill-gluon/grid_gluon.py "$R" --padded 2>&1 | tail -5
fi
save
