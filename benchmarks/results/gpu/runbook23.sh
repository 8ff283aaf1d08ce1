#!/bin/bash
# Eighteenth session, issue 11: batch-8 decode steps through fused_linear's tensor-core product (gemv.fast_rows).
#   t  the GEMV tests (several bf16 rows now take the dot sets by default) and the accelerator's GPU tests of
#      the kernel projections, graph replay and batches;
#   q  Qwen3-0.6B, batch 8, prompts 16-128: the accelerator, the same with the model's matmuls (the batch-8
#      path before this change), transformers' static cache + compile and its dynamic cache (target 5x the best);
#   l  Llama-3-8B, batch 8, prompts 512-4096: the accelerator against the same with the model's matmuls and
#      transformers' static cache + compile.
# Files under $OUT. On the device, from the repository root, after the wheels prefix of the runbook:
#     bash benchmarks/results/gpu/runbook23.sh t q   (about 6 minutes), then   ... l   (about 4 minutes)
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/gpu.txt"
A="python3 -m attnforge.cli bench accel --new-tokens 256 --batch 8 --runs 3 --out $OUT"
for step in "$@"; do
  case $step in
    t)
      timeout 150 python3 -m pytest -q -n 8 -p no:cacheprovider -p no:benchmark tests/test_gemv.py \
        > "$OUT/pytest-gemv.txt" 2>&1
      echo "pytest gemv rc=$?" | tee -a "$OUT/pytest-gemv.txt"; tail -2 "$OUT/pytest-gemv.txt"
      timeout 200 python3 -m pytest -q -p no:cacheprovider -p no:benchmark tests/test_accel.py -k \
        "kernel_projections or graph_replay or ragged or batch" > "$OUT/pytest-accel.txt" 2>&1
      echo "pytest accel rc=$?" | tee -a "$OUT/pytest-accel.txt"; tail -2 "$OUT/pytest-accel.txt"
      ;;
    q)
      timeout 400 $A --model qwen3-0.6b --prompt-tokens 128 --time-budget 300 --stem accelerate-qwen3-0.6b-b8-20261207 \
        --rows attnforge,attnforge-torch-projections,transformers-static-compile,transformers-dynamic \
        > "$OUT/accel-qwen3-b8.txt" 2>&1
      echo "accel rc=$?" | tee -a "$OUT/accel-qwen3-b8.txt"; tail -22 "$OUT/accel-qwen3-b8.txt"
      ;;
    l)
      timeout 330 $A --model llama3-8b --prompt-tokens 4096 --time-budget 230 --stem accelerate-llama3-8b-b8-20261207 \
        --rows attnforge,attnforge-torch-projections,transformers-static-compile > "$OUT/accel-llama-b8.txt" 2>&1
      echo "accel rc=$?" | tee -a "$OUT/accel-llama-b8.txt"; tail -20 "$OUT/accel-llama-b8.txt"
      ;;
  esac
done
