#!/bin/bash
# Seventeenth session, issue 10: K/V through TMA in the decode kernel ("-tma" candidates). Steps:
#   0  the decode GPU tests (the TMA launch's among them) and the GPU-safety ones (t: the TMA tests and the
#      bench's graph tests alone);
#   1  the B1 GQA buckets at 1k-16k keys and the static / ragged caches, every launch also through TMA, plain
#      and in 28-call graphs (16 runners-up there), into $R/tuning.json (stored later with --from-results);
#   2  issue 11: Llama-3-8B's static-cache bucket at prompt 4096 (4096 valid of 8k) likewise (plain launches
#      only), into the same table, then `bench accel` for Llama-3-8B with that table as the user's (88% of the roofline at 4096).
# One tarball under $OUT. On the device, from the repository root, after the wheels prefix of the runbook:
#     bash benchmarks/results/gpu/runbook22.sh t 1   (about 7 minutes), then
#     bash benchmarks/results/gpu/runbook22.sh 2     (about 4 minutes; on the same warm machine after 1)
R=/tmp/runbook22
mkdir -p "$R"
save() { tar czf "$OUT/runbook22.tgz" -C /tmp runbook22; }
nvidia-smi --query-gpu=name,driver_version --format=csv > "$R/gpu.txt"
cat "$R/gpu.txt"
ONLY="B=1 16:8 Lq=1 Lkv=1024 ,B=1 16:8 Lq=1 Lkv=4096 ,B=1 16:8 Lq=1 Lkv=16384 ,B=1 32:8 Lq=1 Lkv=1024 ,B=1 32:8 Lq=1 Lkv=4096 d128,B=1 32:8 Lq=1 Lkv=16384 ,B=1 40:8 Lq=1 Lkv=1024 ,B=1 40:8 Lq=1 Lkv=4096 ,B=1 40:8 Lq=1 Lkv=16384 "
grid() {  # grid <only> <log> <time budget>: one tune run into the shared table and $R/<its stem>.json
  timeout $(( $3 + 100 )) python3 -m attnforge.cli tune --preset decode-grid --only "$1" --full --graph-layers 28 \
    --graph-candidates ${GRAPH_CANDIDATES:-16} --time-budget "$3" --out "$R/$2" --table "$R/tuning.json" \
    > "$R/$2.txt" 2>&1
  echo "tune $2 rc=$?" | tee -a "$R/$2.txt"
  grep -v "^│\|^╭\|^╰" "$R/$2.txt" | tail -14
}
for step in ${*:-0 1}; do
  case $step in
    0)
      timeout 200 python3 -m pytest -q -n 8 -p no:cacheprovider -p no:benchmark -o faulthandler_timeout=100 \
        tests/test_decode.py tests/test_gpu_safety.py > "$R/pytest-decode.txt" 2>&1
      echo "pytest rc=$?" | tee -a "$R/pytest-decode.txt"
      grep -E "FAILED|ERROR|Timeout| passed| failed" "$R/pytest-decode.txt" | cut -c1-160 | sort | uniq | head -20
      ;;
    t)  # the TMA tests, and the bench's graph tests (a graph replayed after a later capture)
      timeout 90 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -k "tma or graph" tests/test_decode.py \
        tests/test_decode_step.py tests/test_bench.py > "$R/pytest-tma.txt" 2>&1
      echo "pytest rc=$?" | tee -a "$R/pytest-tma.txt"
      tail -3 "$R/pytest-tma.txt"
      ;;
    1)  # the static / ragged caches apart: their graphs faulted in tune (h100/decode-tma/graph-crash-*)
      grid "$ONLY" tune-b1 ${BUDGET:-250}
      save
      grid "valid=" tune-valid 100
      ;;
    2)  # plain timing only: a static-cache target's graphs faulted in tune (h100/decode-tma/graph-crash-*)
      timeout 150 python3 -m attnforge.cli tune --model llama3-8b --kernels decode --only "valid=4096" --full \
        --out "$R" --table "$R/tuning.json" > "$R/tune-llama.txt" 2>&1
      echo "tune rc=$?" | tee -a "$R/tune-llama.txt"
      tail -6 "$R/tune-llama.txt"
      ATTNFORGE_CACHE_DIR="$R" timeout 200 python3 -m attnforge.cli bench accel --model llama3-8b \
        --rows attnforge --runs 3 --out "$R" > "$R/accel.txt" 2>&1
      echo "accel rc=$?" | tee -a "$R/accel.txt"
      tail -20 "$R/accel.txt"
      ;;
  esac
  save
done
ls -la "$R"
