#!/bin/bash
# Twenty-second session (files under $OUT, one tarball after each step):
#   g  issue 11: the grid-barrier probe (gpu/grid-barrier/probe.py: Qwen3-0.6B's MLP and layer phases as
#      reads, chained kernels with PDL against one persistent kernel with grid barriers, beside the library's
#      three MLP products; each variant checked against float64 first), about 1.5 minutes;
#   d  issue 14: the prefill probe whose tiles come from a counter (runbook19.sh 1), about 2 minutes.
# On the device, from the repository root, after the wheels prefix (PYTHONPATH with $PWD/src):
#     bash benchmarks/results/gpu/runbook27.sh g d
FINAL=$OUT
R=/tmp/runbook27
mkdir -p "$R"
save() { tar czf "$FINAL/runbook27.tgz" -C /tmp runbook27; }
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$R/gpu.txt"
for step in "$@"; do
  case $step in
    g)
      (cd benchmarks/results/gpu/grid-barrier && timeout 240 python3 probe.py time "$R/grid-barrier.json") \
        > "$R/grid-barrier.txt" 2>&1
      echo "grid barrier rc=$?"; tail -14 "$R/grid-barrier.txt"
      ;;
    d)
      OUT=$R timeout 200 bash benchmarks/results/gpu/runbook19.sh 1 > "$R/runbook19-1.txt" 2>&1
      echo "runbook19 1 rc=$?"; tail -24 "$R/runbook19-1.txt"
      ;;
  esac
  save
done
