#!/usr/bin/env bash
# One host, all its devices (CPU, one GPU or several): data parallel by default.
#   scripts/train_single_host.sh configs/gpt_tiny.yaml runs/gpt_tiny [--set key=value ...] [--resume]
# Re-running the same command with --resume after a crash or pre-emption continues the run.
set -euo pipefail
config=${1:?usage: $0 CONFIG WORKDIR [flags...]}
workdir=${2:?usage: $0 CONFIG WORKDIR [flags...]}
shift 2
exec python "$(dirname "$0")/train.py" --config "$config" --workdir "$workdir" "$@"
