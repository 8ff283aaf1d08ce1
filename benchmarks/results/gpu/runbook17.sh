#!/bin/bash
# The fifteenth session's third runbook (docs/notes/gpu-runbook.md), issue 14. runbook16's run of
# tests/test_prefill_gluon.py passed 34 tests and then did not end within 240 s: which tests hang, and where
# (verbose, pytest's faulthandler dumps the stacks of a test running past 60 s); then the prefill grid with
# the Gluon schedules among the candidates (without the padded targets if any test failed or hung).
# On the device, from the repository root, after the wheels prefix of the runbook:
#     bash benchmarks/results/gpu/runbook17.sh   (about 7 minutes)
R=/tmp/runbook17
mkdir -p "$R"
save() { tar czf "$OUT/runbook17.tgz" -C /tmp runbook17; }
nvidia-smi --query-gpu=name,driver_version --format=csv > "$R/gpu.txt"
cat "$R/gpu.txt"
timeout 170 python3 -m pytest -v -n 8 -p no:cacheprovider -p no:benchmark -o faulthandler_timeout=60 \
  tests/test_prefill_gluon.py > "$R/pytest-prefill-gluon.txt" 2>&1
echo "pytest rc=$?" | tee -a "$R/pytest-prefill-gluon.txt"
grep -E "PASSED|FAILED|ERROR|SKIPPED|Timeout|File .*attnforge|passed|failed" "$R/pytest-prefill-gluon.txt" \
  | grep -v "^\s*$" | cut -c1-150 | sort | uniq | head -70
save
flag=""
grep -q " passed" "$R/pytest-prefill-gluon.txt" && ! grep -qE "FAILED|Timeout" "$R/pytest-prefill-gluon.txt" || flag="--unpadded"
echo "grid $flag"
timeout 280 python3 benchmarks/results/gpu/prefill-gluon/grid_gluon.py "$R" $flag 2>&1 | tail -30
save
ls -la "$R"
