#!/bin/bash
# LoRI training on several nodes of 8 GPUs with SLURM: one torchrun per node, its processes
# joining by the c10d rendezvous on the first node. HSDP (--mesh NODES x 8): each node holds
# a full replica sharded over its 8 GPUs, so the heavy all-gathers stay on the node's fast
# links and only gradients cross nodes. `lori train --plan --world-size $((NODES * 8))
# --mesh ...` tells beforehand whether it fits.
#
#   sbatch --nodes=8 examples/slurm_multinode.sh /path/to/Llama-3-70B data.jsonl runs/70b
#
#SBATCH --job-name=lori
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
set -euo pipefail
model=${1:?base model directory}
data=${2:?data file}
output=${3:?run directory}
nodes=${SLURM_NNODES:?run under sbatch}
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

srun torchrun \
    --nnodes="$nodes" --nproc_per_node=8 \
    --rdzv_backend=c10d --rdzv_endpoint="$head:29500" --rdzv_id="$SLURM_JOB_ID" \
    -m lori.cli train \
    --model "$model" --data "$data" --output "$output" \
    --mesh "${nodes}x8" --precision bf16 --activation-checkpointing \
    --batch-size 4 --max-length 4096 --save-every 200 --resume
