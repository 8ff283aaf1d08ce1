#!/bin/bash
# The twelfth session's runbook (docs/notes/gpu-runbook.md), items 0-2 in one device call, each step saved
# as it ends (at most 8 files come back from a call: everything goes into one tarball under $OUT).
# On the device, from the repository root, after the wheels prefix of the runbook:
#     bash benchmarks/results/gpu/runbook12.sh [0|1|2 ...]   (default: 0 1 2; about 9 minutes in all)
R=/tmp/runbook12
mkdir -p "$R"
save() { tar czf "$OUT/runbook12.tgz" -C /tmp runbook12; }
nvidia-smi --query-gpu=name,driver_version --format=csv > "$R/gpu.txt"
cat "$R/gpu.txt"
steps=${*:-0 1 2}
for step in $steps; do
  case $step in
    0)  # the decode prefetch on the GPU, then in the accelerator's step (issue 11: 88% at prompt 4096)
      timeout 60 python3 -m pytest -q -n 8 -p no:cacheprovider -p no:benchmark tests/test_decode.py \
        tests/test_decode_step.py -k "prefetch or equals_rope" 2>&1 | tail -4 | tee "$R/pytest-prefetch.txt"
      save
      timeout 150 python3 benchmarks/results/gpu/l2-prefetch/prefetch_ab.py "$R/step-ab-kv-prefetch-llama3-8b.json" \
        model=llama3-8b variants=base,kv-prefetch runs=3 2>&1 | tail -5 | tee "$R/step-ab-kv-prefetch-llama3-8b.txt"
      ;;
    1)  # issue 10: the "-pf" candidates against the plain ones, plain and in 28-call graphs
      timeout 230 python3 -m attnforge.cli tune --preset decode-grid --only "B=1 16:8 Lq=1 Lkv=1024 ,B=1 16:8 Lq=1 \
Lkv=4096 d128,B=1 16:8 Lq=1 Lkv=16384 ,B=1 32:8 Lq=1 Lkv=1024 ,B=1 32:8 Lq=1 Lkv=4096 d128,B=1 40:8 Lq=1 \
Lkv=1024 ,B=1 40:8 Lq=1 Lkv=4096 " --full --graph-layers 28 --graph-candidates 16 --out "$R" 2>&1 | tail -12
      ;;
    2)  # issue 14: every prefill launch also through TMA
      timeout 200 python3 -m attnforge.cli tune --preset prefill-grid --full --out "$R" 2>&1 | tail -30
      ;;
  esac
  save
done
ls -la "$R"
