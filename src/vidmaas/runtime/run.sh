#!/bin/sh
# The job's entry point, as the seed's run.sh: fetch the input, generate under torchrun,
# postprocess on the node of rank 0. Arguments are the job's (see docs/runtime.md);
# the environment is DESIGN §5's (VIDMAAS_*, MASTER_ADDR/PORT, PET_*).
set -eu

vidmaas-job fetch-input "$@"

nnodes="${PET_NNODES:-1}"
nproc="${PET_NPROC_PER_NODE:-1}"
if [ -n "${MASTER_ADDR:-}" ]; then
    rdzv="--node-rank ${PET_NODE_RANK:-0} --master-addr ${MASTER_ADDR} --master-port ${MASTER_PORT:-29500}"
else
    rdzv="--standalone"
fi
# shellcheck disable=SC2086  # rdzv is several words on purpose
torchrun --nnodes "$nnodes" --nproc-per-node "$nproc" $rdzv \
    -m vidmaas.runtime.cli generate "$@"

if [ "${PET_NODE_RANK:-0}" = "0" ]; then
    exec vidmaas-job postprocess "$@"
fi
