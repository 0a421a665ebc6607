#!/usr/bin/env bash
# TPU figures for BENCHMARKS.md, the twin of bench_gpu.sh for when a TPU VM is lent: the
# plan's estimate and the chip's measurement of the same step, side by side. For each batch
# in BATCHES (largest first) until one runs: `plan` of gpt2_small in bfloat16 at T=1024 for
# one chip of this VM's TPU (compiled by libtpu, estimated), then `bench train` of the same
# shape on the chip itself (measured; --no-torch). Then `bench decode`. Results (JSON and
# logs) go to OUTDIR; the plan's estimated MFU and the bench's measured MFU are printed
# together, labelled as what they are.
#
#   scripts/bench_tpu.sh OUTDIR [extra `bench train` flags ...]
#
# Needs `pip install -e '.[tpu]'` on a TPU VM (TPU_ACCELERATOR_TYPE set, as Cloud TPU VMs
# do; CHIP overrides the one-chip slice name planned for, e.g. CHIP=v5e-1).
set -euo pipefail
out=${1:?usage: $0 OUTDIR [bench train flags ...]}
shift
mkdir -p "$out"
accelerator=${TPU_ACCELERATOR_TYPE:?not on a TPU VM: TPU_ACCELERATOR_TYPE is unset}
version=${accelerator%%-*}
case "$version" in
  v4|v5p) chip=${CHIP:-$version-2} ;;  # named by TensorCores: one chip is two
  *) chip=${CHIP:-$version-1} ;;
esac
python -c 'import jax; print("JAX devices:", jax.devices())'

fitted=""
for batch in ${BATCHES:-64 48 32 24 16 12 8 4 2 1}; do
  echo "plan (estimate): gpt2_small, bfloat16, T=1024, batch $batch, on $chip"
  if ! python -m flaxformer_lite plan --config gpt2_small --topology "$chip" --json \
      --set model.dtype=bfloat16 data.seq_len=1024 "data.batch_size=$batch" >"$out/plan_b$batch.json" \
      2>"$out/plan_b$batch.log"; then
    tail -n 5 "$out/plan_b$batch.log" >&2
    exit 1
  fi
  if ! python -c 'import json, sys; sys.exit(not json.load(open(sys.argv[1]))["fits"])' "$out/plan_b$batch.json"; then
    echo "  the plan says batch $batch does not fit one chip; trying a smaller one"
    continue
  fi
  log="$out/train_b$batch.log"
  echo "bench train (measured): gpt2_small, bfloat16, T=1024, batch $batch"
  if python -m flaxformer_lite bench train --preset gpt2_small --dtype bfloat16 --batch "$batch" --no-torch \
      --compile-depths --memory-layers 0 --json "$out/train_b$batch.json" "$@" >"$log" 2>&1; then
    fitted=$batch
    cat "$log"
    break
  fi
  if grep -qiE 'RESOURCE_EXHAUSTED|out of memory' "$log"; then
    echo "  batch $batch planned to fit but ran out of memory on the chip; trying a smaller one"
    continue
  fi
  tail -n 20 "$log"
  echo "bench train failed at batch $batch for another reason than memory (log above: $log)" >&2
  exit 1
done
if [ -z "$fitted" ]; then
  echo "no batch in '${BATCHES:-64 48 32 24 16 12 8 4 2 1}' runs; see $out/*.log" >&2
  exit 1
fi
python - "$out/plan_b$fitted.json" "$out/train_b$fitted.json" <<'EOF'
import json, sys
plan, bench = (json.load(open(p)) for p in sys.argv[1:])
print(f"estimated MFU of bf16 peak (plan, {plan['estimate']['source']}): {plan['estimate']['mfu']:.3f}")
measured = {name: run["mfu"] for name, run in bench.get("steps", {}).items() if isinstance(run, dict) and "mfu" in run}
print("measured MFU of the chip's timed matmul peak (bench train):", measured or "see the JSON")
EOF
python -m flaxformer_lite bench decode --json "$out/decode.json" ${DECODE_FLAGS:-} | tee "$out/decode.log"
