#!/usr/bin/env bash
# Several hosts (or several processes on one host), one process per host, run on each:
#   COORDINATOR=host0:1234 NUM_PROCESSES=4 PROCESS_ID=<0..3> \
#     scripts/train_multihost.sh configs/gpt2_small.yaml /shared/runs/gpt2 --set parallel.fsdp=4
# WORKDIR must be one shared filesystem path: every process writes its checkpoint shards
# there; only process 0 writes config.yaml, metrics.jsonl, TensorBoard events and plots.
# data.batch_size is the global batch; each process reads its own shard of the corpus.
# On SLURM or a TPU pod, FFL_DISTRIBUTED=auto lets jax.distributed find the cluster instead.
#
# Try it on one machine with CPU processes (2 processes x 2 devices, fsdp over all four):
#   for i in 0 1; do
#     COORDINATOR=localhost:12355 NUM_PROCESSES=2 PROCESS_ID=$i JAX_PLATFORMS=cpu \
#     XLA_FLAGS=--xla_force_host_platform_device_count=2 \
#       scripts/train_multihost.sh configs/gpt_tiny.yaml /tmp/mh --set parallel.data=1 parallel.fsdp=-1 &
#   done; wait
set -euo pipefail
config=${1:?usage: $0 CONFIG WORKDIR [flags...]}
workdir=${2:?usage: $0 CONFIG WORKDIR [flags...]}
shift 2
if [ -z "${FFL_DISTRIBUTED:-}" ]; then
  export JAX_COORDINATOR_ADDRESS=${COORDINATOR:?set COORDINATOR=host:port (process 0 listens there)}
  export JAX_NUM_PROCESSES=${NUM_PROCESSES:?set NUM_PROCESSES}
  export JAX_PROCESS_ID=${PROCESS_ID:?set PROCESS_ID (0 .. NUM_PROCESSES-1)}
fi
exec python "$(dirname "$0")/train.py" --config "$config" --workdir "$workdir" "$@"
