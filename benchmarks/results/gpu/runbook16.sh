#!/bin/bash
# The fifteenth session's second runbook (docs/notes/gpu-runbook.md), issue 14: FA3's ping-pong in the Gluon
# prefill kernel (benchmarks/results/gpu/prefill-gluon/fa_gluon.py, "-pp": the two consumer warpgroups issue
# their products in turn, each block's PV deferred into the next block's turn), checked under `timeout` (a
# wrong barrier protocol deadlocks), then timed with the split variants against SDPA and the stored launch,
# causal 32:8 / 16:8 d128 and MHA d64. One tarball under $OUT.
# On the device, from the repository root, after the wheels prefix of the runbook:
#     bash benchmarks/results/gpu/runbook16.sh   (about 4 minutes)
R=/tmp/runbook16
mkdir -p "$R"
save() { tar czf "$OUT/runbook16.tgz" -C /tmp runbook16; }
nvidia-smi --query-gpu=name,driver_version --format=csv > "$R/gpu.txt"
cat "$R/gpu.txt"
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
  timeout 300 python3 benchmarks/results/gpu/prefill-gluon/fa_gluon.py time "$R/gluon-time.json" $passed 2>&1 \
    | tail -40 | tee "$R/gluon-time.txt"
fi
save
ls -la "$R"
