#!/usr/bin/env bash
# Train on the nodes of a DeepSpeed hostfile (lines "HOSTNAME slots=8"), validated first.
#   scripts/launch.sh --hostfile hosts.txt --config configs/runs/70m/l2e.yml [--set k=v ...] [--dry-run]
#   ssh/pdsh: one command on the first node starts every node (the DeepSpeed launcher, pdsh).
#   no ssh:   run on EVERY node:  scripts/launch.sh --hostfile hosts.txt --no-ssh --node-rank R --config ...
# Options: --master-addr A (default: first host), --master-port P (29500), --resume auto|PATH. See docs/distributed.md.
# Ctrl-C once (or kill -USR1 PID) stops with a checkpoint: exit 75 (docs/distributed.md "Long runs").
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/../tools/launch.py" hostfile "$@"
