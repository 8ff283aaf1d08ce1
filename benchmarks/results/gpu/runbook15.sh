#!/bin/bash
# The fifteenth session's runbook (docs/notes/gpu-runbook.md), issue 14: the Gluon prefill kernel
# (benchmarks/results/gpu/prefill-gluon/fa_gluon.py: explicit producer / consumer partitions, the lean key
# blocks unmasked, "-pipe" with FA3's overlap of S_{i+1} and the softmax of S_i). Never run on a GPU before:
# each variant is checked in its own process under `timeout` (a wrong mbarrier protocol deadlocks), then the
# variants that passed are timed against SDPA and the stored launch. One tarball under $OUT.
# On the device, from the repository root, after the wheels prefix of the runbook:
#     bash benchmarks/results/gpu/runbook15.sh   (about 5 minutes)
R=/tmp/runbook15
mkdir -p "$R"
save() { tar czf "$OUT/runbook15.tgz" -C /tmp runbook15; }
nvidia-smi --query-gpu=name,driver_version --format=csv > "$R/gpu.txt"
cat "$R/gpu.txt"
passed=""
for v in n128-st2 n64-st3 n128-st3-pipe n64-st4-pipe n128-st2-split n128-st3-pipe-split; do
  timeout 60 python3 benchmarks/results/gpu/prefill-gluon/fa_gluon.py check $v > "$R/check-$v.txt" 2>&1
  rc=$?
  echo "[$v] rc=$rc" | tee -a "$R/check.txt"
  tail -3 "$R/check-$v.txt"
  if [ $rc -eq 0 ]; then passed="$passed $v"; fi
  save
done
# what the "ws" launch's copy of a Q in transformers' layout costs (ws_probe.py time: 2 rows)
timeout 90 python3 benchmarks/results/gpu/prefill-ws/ws_probe.py time 2>&1 | tail -10 | tee "$R/ws-time.txt"
save
if [ -n "$passed" ]; then
  timeout 200 python3 benchmarks/results/gpu/prefill-gluon/fa_gluon.py time "$R/gluon-time.json" $passed 2>&1 \
    | tail -30 | tee "$R/gluon-time.txt"
fi
save
ls -la "$R"
