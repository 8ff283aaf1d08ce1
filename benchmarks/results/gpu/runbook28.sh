#!/bin/bash
# Twenty-third session (files under $OUT, one tarball after each step):
#   f  issue 10: the decode read-floor probe (gpu/decode-floor/probe.py: torch SDPA and the library against
#      a split kernel with the library's grid and no softmax or merge, flat reads with 132-1056 programs, and
#      torch's sum over the same K/V; plain and in 28-call graphs, B1 32:8 d128 at 1k-64k), about 2 minutes;
#   s  issue 11: the grid-barrier probe's chained phases at 132-1056 programs (gpu/grid-barrier/probe.py
#      sweep: do reads of the batch-8 step's sizes, 4-12 MiB a kernel, go faster with more programs than
#      SMs?), beside the library's three MLP products, about 1.5 minutes;
#   a  issue 14: the Gluon launch causal and not at 512-8k tokens (gpu/prefill-gluon/ablate.py: is the 2k
#      loss the tile's fixed cost or the causal blocks?), about 1 minute;
#   m  issue 10: the two-part merge ("merge_parts", `-mp` candidates): the decode GPU tests of the merge, then
#      the B1 40:8 buckets (1k / 4k / 16k; GQA 5:1, whose 5 rows sit in 8-row partials) tuned with every
#      launch also as `-mp`, plain and in 28-call graphs, into $R/tuning.json (each `-mp` launch timed beside
#      its twin in the same run), about 7 minutes; store with `attnforge tune --from-results`;
#   n  issue 11: the swapped product's narrow merge (`GemvParams.narrow_merge`: the last program sums only
#      the 8 real rows of the partials, as a tree; offline its loads in 1-2 round trips where 16 rows took
#      up to 8) and its norm's pass in 1024-wide slices (`GemvParams.rms_block`: 1 round trip for Qwen3-0.6B
#      where it took 2-4): the GEMV GPU tests of both, swap_ab.py on Qwen3-0.6B's products (each variant
#      against float64, then per call in graphs, `narrow-merge`, `rms-1024` and both among them), then
#      Qwen3-0.6B's batch-8 step with each (accel_sets.py), about 9 minutes;
#   p  issue 14 on an H200: the Gluon tests and the prefill grid (runbook19.sh 0 2), about 6 minutes.
# On the device, from the repository root, after the wheels prefix (PYTHONPATH with $PWD/src):
#     bash benchmarks/results/gpu/runbook28.sh m   (any GPU), then   ... n   and   ... f s a   (calls of their own), or   ... p   (an H200)
FINAL=$OUT
R=/tmp/runbook28
mkdir -p "$R"
save() { tar czf "$FINAL/runbook28.tgz" -C /tmp runbook28; }
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$R/gpu.txt"
for step in "$@"; do
  case $step in
    f)
      (cd benchmarks/results/gpu/decode-floor && timeout 300 python3 probe.py time "$R/decode-floor.json") \
        > "$R/decode-floor.txt" 2>&1
      echo "decode floor rc=$?"; tail -60 "$R/decode-floor.txt"
      ;;
    s)
      (cd benchmarks/results/gpu/grid-barrier && timeout 240 python3 probe.py sweep "$R/chain-sweep.json") \
        > "$R/chain-sweep.txt" 2>&1
      echo "chain sweep rc=$?"; tail -8 "$R/chain-sweep.txt"
      ;;
    a)
      (cd benchmarks/results/gpu/prefill-gluon && timeout 200 python3 ablate.py "$R/prefill-ablate.json") \
        > "$R/prefill-ablate.txt" 2>&1
      echo "prefill ablate rc=$?"; tail -42 "$R/prefill-ablate.txt"
      ;;
    m)
      timeout 150 python3 -m pytest -q -n 8 -p no:cacheprovider -p no:benchmark tests/test_decode.py \
        tests/test_decode_step.py -k "merg or two_part or no_power_of_two or compiles" > "$R/pytest-merge.txt" 2>&1
      echo "pytest merge rc=$?" | tee -a "$R/pytest-merge.txt"; tail -3 "$R/pytest-merge.txt"
      ONLY="B=1 40:8 Lq=1 Lkv=1024 ,B=1 40:8 Lq=1 Lkv=4096 ,B=1 40:8 Lq=1 Lkv=16384 "
      timeout 400 python3 -m attnforge.cli tune --preset decode-grid --only "$ONLY" --full --graph-layers 28 \
        --graph-candidates 16 --time-budget 250 --out "$R/tune-40-8" --table "$R/tuning.json" \
        > "$R/tune-40-8.txt" 2>&1
      echo "tune 40:8 rc=$?" | tee -a "$R/tune-40-8.txt"; grep -v "^│\|^╭\|^╰" "$R/tune-40-8.txt" | tail -14
      ;;
    n)
      timeout 100 python3 -m pytest -q -n 8 -p no:cacheprovider -p no:benchmark tests/test_gemv.py \
        -k "narrow_merge or wider_slices or fit_hoppers" > "$R/pytest-narrow.txt" 2>&1
      echo "pytest narrow rc=$?" | tee -a "$R/pytest-narrow.txt"; tail -2 "$R/pytest-narrow.txt"
      (cd benchmarks/results/gpu/gemv-swap && timeout 200 python3 swap_ab.py "$R/swap-ab.json" qwen3) \
        > "$R/swap-ab.txt" 2>&1
      echo "swap ab rc=$?"; tail -9 "$R/swap-ab.txt"
      (cd benchmarks/results/gpu/gemv-swap && timeout 260 python3 accel_sets.py "$R/swap-ab.json" "$R" \
        narrow-merge narrow-merge-rms-1024,narrow-merge,rms-1024) > "$R/accel-narrow.txt" 2>&1
      echo "accel narrow rc=$?"; grep -E "^ attnforge|Read bandwidth|us \(default" "$R/accel-narrow.txt"
      ;;
    p)
      OUT=$R timeout 540 bash benchmarks/results/gpu/runbook19.sh 0 2 > "$R/runbook19-02.txt" 2>&1
      echo "runbook19 0 2 rc=$?"; tail -30 "$R/runbook19-02.txt"
      ;;
  esac
  save
done
