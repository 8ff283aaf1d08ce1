#!/bin/bash
# Nineteenth session, issue 11: the swapped product in fused_linear (2-16 rows of 16-bit weights through TMA,
# gemv._swap_kernel; the accelerator's decode step takes it up to gemv.fast_rows = 8 rows on Hopper).
#   t  GPU tests: tests/test_gemv.py (the swap against float64 at model sizes, TMA and pointer paths), the
#      accelerator's kernel projections at batch 1/3/8, graph replay, batches, ragged; the TMA tests of the
#      decode and prefill kernels (tma_aligned now takes any rank);
#   q  Qwen3-0.6B, batch 8, prompts 16-128: the accelerator, the same with the model's matmuls, transformers'
#      static cache + compile (its best batched row; target 5x);
#   l  Llama-3-8B, batch 8, prompts 512-4096: the accelerator against the model's matmuls.
# Files under $OUT. On the device, from the repository root, after the wheels prefix of the runbook:
#     bash benchmarks/results/gpu/runbook25.sh t q   (about 7 minutes), then   ... l   (about 4 minutes)
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/gpu.txt"
A="python3 -m attnforge.cli bench accel --new-tokens 256 --batch 8 --runs 3 --out $OUT"
for step in "$@"; do
  case $step in
    t)
      timeout 200 python3 -m pytest -q -n 8 -p no:cacheprovider -p no:benchmark tests/test_gemv.py \
        tests/test_decode.py tests/test_prefill.py -k "gemv or tma" > "$OUT/pytest-gemv.txt" 2>&1
      echo "pytest gemv/tma rc=$?" | tee -a "$OUT/pytest-gemv.txt"; grep -E "FAILED|Error" "$OUT/pytest-gemv.txt" | head -8
      tail -1 "$OUT/pytest-gemv.txt"
      timeout 200 python3 -m pytest -q -p no:cacheprovider -p no:benchmark tests/test_accel.py -k \
        "kernel_projections or graph_replay or ragged or batch or several_rows" > "$OUT/pytest-accel.txt" 2>&1
      echo "pytest accel rc=$?" | tee -a "$OUT/pytest-accel.txt"; grep -E "FAILED|Error" "$OUT/pytest-accel.txt" | head -8
      tail -1 "$OUT/pytest-accel.txt"
      ;;
    q)
      timeout 330 $A --model qwen3-0.6b --prompt-tokens 128 --time-budget 270 --stem accelerate-qwen3-0.6b-b8-swap \
        --rows attnforge,attnforge-torch-projections,transformers-static-compile > "$OUT/accel-qwen3-b8.txt" 2>&1
      echo "accel rc=$?" | tee -a "$OUT/accel-qwen3-b8.txt"; tail -14 "$OUT/accel-qwen3-b8.txt"
      ;;
    l)
      timeout 300 $A --model llama3-8b --prompt-tokens 4096 --time-budget 230 --stem accelerate-llama3-8b-b8-swap \
        --rows attnforge,attnforge-torch-projections > "$OUT/accel-llama-b8.txt" 2>&1
      echo "accel rc=$?" | tee -a "$OUT/accel-llama-b8.txt"; tail -14 "$OUT/accel-llama-b8.txt"
      ;;
  esac
done
