#!/bin/bash
# Twentieth session, issue 11 (files under $OUT):
#   t  GPU tests of what the twentieth session added: the swapped product's tests (prefetch, narrow tiles,
#      early with the residual) and the decode step's, about 1.5 minutes;
#   e  the swapped product's launch A/B (gpu/gemv-swap/swap_ab.py: the default; each split's first weight
#      slice read before the PDL wait, `early`; early with twice the split; narrow tiles of 32 / 16 weight
#      rows on mma.sync, early; 8 rows, Qwen3-0.6B's and Llama-3-8B's products and Qwen3's LM head, checked
#      against float64 first), about 3 minutes;
#   x  the batch-8 step with each product's fastest variant of e patched in (gpu/gemv-swap/accel_sets.py:
#      the library, then those sets; Qwen3-0.6B, prompts 16-128), about 3 minutes;
#   f  (after e, same call) the batch-8 step with `st-fit` wherever e ran it (no more stages than a split's
#      loop has slices: Qwen3's o and down take 41 KB of shared memory instead of 164, so the next kernel's
#      programs can share the SM), then with gate/up also at twice the split and one stage (74 KB instead
#      of 222: every kernel of the step then fits beside its neighbours), about 4 minutes;
#   p  Qwen3-0.6B's batch-8 step under the profiler (h100/accel-profile/prof_accel.py batch=8), 40 s;
#   a  the batch-8 attention step's bucket (d128-m2-b8-kv1k-lens: B8 16:8, a 1k cache, 64..512 valid keys
#      ragged as the accelerator's batches; candidates with alone_tiles=0 split short sequences too), full
#      sweep, plain and in 28-call graphs, about 3 minutes; store it with `attnforge tune --from-results`.
# Run at 5468eca on an H100 (h100/swap-ab-20261207), with a step w since removed (decode_step.WARM_TILES:
# slower at batch 1 and 8, taken out with its code). Then: the winning sets into gemv._swap_params /
# default_params (and the tests of the defaults), and `bash benchmarks/results/gpu/runbook25.sh t q`
# measures the step against transformers (target 5x).
# e and f ran at 4102c3c on an H100 (h100/st-fit-20261207): the fitted sets were slower alone and the step
# with them slower still (863.7 -> 815.1 -> 771.6 tok/s a sequence); the stages stay.
# On the device, from the repository root, after the wheels prefix (PYTHONPATH with $PWD/src):
#     bash benchmarks/results/gpu/runbook26.sh t e   (about 6 minutes), then   ... x   (about 4), then
#     ... p a   (about 4)
# Files go to /tmp/runbook26 and come back as one tarball, $OUT/runbook26.tgz, after each step (at most 8
# files come back a call); a swap-ab.json copied into $OUT before the run is taken in for x and f.
FINAL=$OUT
OUT=/tmp/runbook26
mkdir -p "$OUT"
[ -f "$FINAL/swap-ab.json" ] && cp "$FINAL/swap-ab.json" "$OUT/"
save() { tar czf "$FINAL/runbook26.tgz" -C /tmp runbook26; }
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/gpu.txt"
for step in "$@"; do
  case $step in
    t)
      timeout 150 python3 -m pytest -q -n 8 -p no:cacheprovider -p no:benchmark tests/test_gemv.py \
        tests/test_decode_step.py -k "swap or step or l2" > "$OUT/pytest-t26.txt" 2>&1
      echo "pytest rc=$?" | tee -a "$OUT/pytest-t26.txt"; grep -E "FAILED|Error" "$OUT/pytest-t26.txt" | head -8
      tail -1 "$OUT/pytest-t26.txt"
      ;;
    e)
      (cd benchmarks/results/gpu/gemv-swap && timeout 330 python3 swap_ab.py "$OUT/swap-ab.json") \
        > "$OUT/swap-ab.txt" 2>&1
      echo "swap ab rc=$?"; tail -9 "$OUT/swap-ab.txt"
      ;;
    p)
      timeout 90 python3 benchmarks/results/h100/accel-profile/prof_accel.py "$OUT" 128 batch=8 \
        > "$OUT/prof-b8.txt" 2>&1
      echo "prof rc=$?"; grep -E "^decode|^us per step" "$OUT/prof-b8.txt"
      ;;
    a)
      timeout 280 python3 -m attnforge.cli tune --model qwen3-0.6b --batch 8 --kernels decode --full \
        --graph-layers 28 --only "Lkv=1024 d128 bfloat16 valid" --table "$OUT/tuning.json" \
        --out "$OUT/tune-b8" > "$OUT/tune-b8.txt" 2>&1
      echo "tune b8 rc=$?"; tail -8 "$OUT/tune-b8.txt"
      ;;
    f)
      (cd benchmarks/results/gpu/gemv-swap && timeout 400 python3 accel_sets.py "$OUT/swap-ab.json" "$OUT" st-fit \
        2x-split-st-fit,st-fit) > "$OUT/accel-st-fit.txt" 2>&1
      echo "accel st-fit rc=$?"; grep -E "^ attnforge|Read bandwidth|us \(default" "$OUT/accel-st-fit.txt"
      ;;
    x)
      (cd benchmarks/results/gpu/gemv-swap && timeout 330 python3 accel_sets.py "$OUT/swap-ab.json" "$OUT") \
        > "$OUT/accel-sets.txt" 2>&1
      echo "accel sets rc=$?"; grep -E "^ attnforge|Read bandwidth|us \(default" "$OUT/accel-sets.txt"
      ;;
  esac
  save
done
