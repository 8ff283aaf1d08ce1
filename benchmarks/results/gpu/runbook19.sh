#!/bin/bash
# The next session's runbook (docs/notes/gpu-runbook.md), issue 14: the Gluon prefill launch on whatever GPU
# comes (an H200 has no entries with it yet): its GPU tests, then the prefill grid with its schedules among
# the candidates (prefill-gluon/grid_gluon.py, every target; the padded ones last). Between the two, the
# persistent probe (prefill-gluon/fa_gluon_persistent.py, never run before: checked under `timeout`, timed
# against the library's st3-pp and SDPA if right). One tarball under $OUT.
#     bash benchmarks/results/gpu/runbook19.sh   (about 7 minutes)
R=/tmp/runbook19
mkdir -p "$R"
save() { tar czf "$OUT/runbook19.tgz" -C /tmp runbook19; }
nvidia-smi --query-gpu=name,driver_version --format=csv > "$R/gpu.txt"
cat "$R/gpu.txt"
timeout 170 python3 -m pytest -v -n 8 -p no:cacheprovider -p no:benchmark -o faulthandler_timeout=100 \
  tests/test_prefill_gluon.py > "$R/pytest-prefill-gluon.txt" 2>&1
echo "pytest rc=$?" | tee -a "$R/pytest-prefill-gluon.txt"
grep -E "FAILED|ERROR|Timeout| passed| failed" "$R/pytest-prefill-gluon.txt" | cut -c1-150 | sort | uniq
save
(cd benchmarks/results/gpu/prefill-gluon && timeout 60 python3 fa_gluon_persistent.py check) \
  > "$R/persistent-check.txt" 2>&1
echo "persistent check rc=$?" | tee -a "$R/persistent-check.txt"
tail -6 "$R/persistent-check.txt"
if grep -q "check rc=0" "$R/persistent-check.txt"; then
  (cd benchmarks/results/gpu/prefill-gluon && timeout 120 python3 fa_gluon_persistent.py time "$R/persistent-time.json") \
    2>&1 | tail -15 | tee "$R/persistent-time.txt"
fi
save
if grep -q " passed" "$R/pytest-prefill-gluon.txt" && ! grep -qE "FAILED|Timeout" "$R/pytest-prefill-gluon.txt"; then
  timeout 330 python3 benchmarks/results/gpu/prefill-gluon/grid_gluon.py "$R" 2>&1 | tail -30
fi
save
ls -la "$R"
