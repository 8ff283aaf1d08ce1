#!/bin/bash
# The next session's runbook (docs/notes/gpu-runbook.md), issue 14, on whatever GPU comes (an H200 has no
# Gluon entries yet). Steps:
#   0  the Gluon launch's GPU tests (tests/test_prefill_gluon.py: every schedule, the persistent one included);
#   1  the probe of a persistent schedule that takes its tiles from a counter (prefill-gluon/fa_gluon_dynamic.py,
#      never run before): checked under `timeout` (bit for bit against the library's persistent schedule),
#      then timed if right (fa_gluon_persistent.py's rows, padded batches included). The sixteenth session ran
#      the persistent and d64 probes through step 1 (h100/prefill-gluon/runbook20-*);
#   2  the prefill grid with the Gluon schedules among the candidates (prefill-gluon/grid_gluon.py), if step
#      0 passed (or was not run in this call).
# One tarball under $OUT. On the device, from the repository root, after the wheels prefix of the runbook:
#     bash benchmarks/results/gpu/runbook19.sh 0 2   (about 6 minutes), or
#     bash benchmarks/results/gpu/runbook19.sh 1     (about 2 minutes)
R=/tmp/runbook19
ROOT=$PWD  # the probes run from their directory: the package by an absolute path
mkdir -p "$R"
save() { tar czf "$OUT/runbook19.tgz" -C /tmp runbook19; }
probe() {  # probe <script> <name>: check under timeout, then time if right
  (cd benchmarks/results/gpu/prefill-gluon && timeout 60 env PYTHONPATH="$ROOT/src:$PYTHONPATH" python3 "$1" check) > "$R/$2-check.txt" 2>&1
  echo "$2 check rc=$?" | tee -a "$R/$2-check.txt"
  tail -6 "$R/$2-check.txt"
  if grep -q "check rc=0" "$R/$2-check.txt"; then
    (cd benchmarks/results/gpu/prefill-gluon && timeout 100 env PYTHONPATH="$ROOT/src:$PYTHONPATH" python3 "$1" time "$R/$2-time.json") 2>&1 \
      | tail -30 | tee "$R/$2-time.txt"
  fi
}
nvidia-smi --query-gpu=name,driver_version --format=csv > "$R/gpu.txt"
cat "$R/gpu.txt"
for step in ${*:-0 1 2}; do
  case $step in
    0)
      timeout 170 python3 -m pytest -v -n 8 -p no:cacheprovider -p no:benchmark -o faulthandler_timeout=100 \
        tests/test_prefill_gluon.py > "$R/pytest-prefill-gluon.txt" 2>&1
      echo "pytest rc=$?" | tee -a "$R/pytest-prefill-gluon.txt"
      grep -E "FAILED|ERROR|Timeout| passed| failed" "$R/pytest-prefill-gluon.txt" | cut -c1-150 | sort | uniq
      ;;
    1)
      probe fa_gluon_dynamic.py dynamic
      ;;
    2)
      if [ -f "$R/pytest-prefill-gluon.txt" ] && ! grep -q "pytest rc=0" "$R/pytest-prefill-gluon.txt"; then
        echo "the Gluon tests did not pass: no grid"
      else
        timeout 330 python3 benchmarks/results/gpu/prefill-gluon/grid_gluon.py "$R" 2>&1 | tail -30
      fi
      ;;
  esac
  save
done
ls -la "$R"
