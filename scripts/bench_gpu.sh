#!/usr/bin/env bash
# GPU figures for BENCHMARKS.md: `bench train` for gpt2_small in bfloat16 at T=1024 with
# cuDNN flash attention (attention_impl cudnn), at the largest batch that fits, then
# `bench decode`. Results (JSON and logs) go to OUTDIR. If cuDNN attention fails for another
# reason than memory, the same batch is run again with attention_impl auto (JAX's XLA
# attention) and the script says so; the JSON records which one ran (run.attention_impl).
#
#   scripts/bench_gpu.sh OUTDIR [extra `bench train` flags ...]
#
# BATCHES lists the batch sizes to try, largest first; the first that does not run out of
# memory is the one reported (train_b<N>.json). DECODE_FLAGS adds flags to bench decode.
# The transformers side is skipped (--no-torch) when JAX has a GPU and torch sees no CUDA.
# A CPU smoke run with a tiny shape:
#   BATCHES="4 2" DECODE_FLAGS="--layers 1 --d-model 32 --heads 2 --vocab 256 --new-tokens 4 --positions --repeats 1" \
#     scripts/bench_gpu.sh /tmp/bench_gpu --layers 1 --d-model 32 --heads 2 --vocab 256 --seq-len 32 \
#     --steps 1 --rounds 1 --warmup 1 --peak-size 128
set -euo pipefail
out=${1:?usage: $0 OUTDIR [bench train flags ...]}
shift
mkdir -p "$out"
# Both frameworks share the device: JAX must not take 75% of its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
torch_flags=()
python -c 'import sys, jax, torch; sys.exit(jax.default_backend() == "gpu" and not torch.cuda.is_available())' \
  2>/dev/null || torch_flags=(--no-torch)
python -c 'import jax; print("JAX devices:", jax.devices())'

fitted=""
impl=${ATTENTION_IMPL:-cudnn}
for batch in ${BATCHES:-64 48 32 24 16 12 8 4 2 1}; do
  while :; do
    log="$out/train_b${batch}_$impl.log"
    echo "bench train: gpt2_small, bfloat16, T=1024, batch $batch, attention $impl"
    if python -m flaxformer_lite bench train --preset gpt2_small --dtype bfloat16 --attention-impl "$impl" \
        --batch "$batch" --compile-depths --memory-layers 0 "${torch_flags[@]}" \
        --json "$out/train_b$batch.json" "$@" >"$log" 2>&1; then
      fitted=$batch
      cat "$log"
      break 2
    fi
    if grep -qiE 'RESOURCE_EXHAUSTED|out of memory' "$log"; then
      echo "  batch $batch does not fit; trying a smaller one"
      continue 2
    fi
    tail -n 20 "$log"
    if [ "$impl" = cudnn ]; then
      echo "  cuDNN attention failed for another reason than memory (above; $log): trying attention auto"
      impl=auto
      continue
    fi
    echo "bench train failed at batch $batch for another reason than memory (log above: $log)" >&2
    exit 1
  done
done
if [ -z "$fitted" ]; then
  echo "no batch in '${BATCHES:-64 48 32 24 16 12 8 4 2 1}' fits; see $out/train_b*.log" >&2
  exit 1
fi
echo "largest batch that fits: $fitted ($out/train_b$fitted.json)"

# shellcheck disable=SC2086  # DECODE_FLAGS is a list of flags
python -m flaxformer_lite bench decode --json "$out/decode.json" ${DECODE_FLAGS:-} | tee "$out/decode.log"
