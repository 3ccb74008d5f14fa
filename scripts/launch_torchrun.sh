#!/usr/bin/env bash
# One torchrun per node, no ssh and no hostfile: run on EVERY node with its own --node-rank.
#   scripts/launch_torchrun.sh --nnodes 3 --node-rank R --master-addr NODE0 [--nproc-per-node 8] \
#       --config configs/runs/70m/l2e.yml [--set k=v ...] [--dry-run]
# --shutdown-timeout S (600): torchrun's wait for the ranks after a stop signal (≥ one step + a save).
# Ctrl-C once (or kill -USR1 PID) stops with a checkpoint: exit 75 (docs/distributed.md "Long runs").
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/../tools/launch.py" torchrun "$@"
