#!/usr/bin/env bash
# Start this machine's Celery workers for the cluster deployment (README, "Cluster"):
#   one GPU worker per GPU (its own CUDA_VISIBLE_DEVICES, one step at a time, queues dagster and gpu),
#   and one CPU worker for index and validation with a pool process per remaining core.
# The environment (DAGSTER_HOME, CURATOR_CELERY_BROKER/BACKEND, CURATOR_PG_*, CURATOR_DATASET_URL,
# store credentials) must be set as for the daemon. Options: CPU_WORKERS=N overrides the pool size,
# GPUS=N the GPU count (default: `nvidia-smi -L`), CELERY_CONFIG the worker YAML.
set -euo pipefail
cd "$(dirname "$0")/../.."
config="${CELERY_CONFIG:-deploy/cluster/celery.yaml}"
host="$(hostname -s)"
gpus="${GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ' || true)}"
cores="$(nproc)"
cpu="${CPU_WORKERS:-$(( cores - 4 * gpus > 1 ? cores - 4 * gpus : 1 ))}"  # ~4 cores stay with each GPU worker

pids=()
for ((i = 0; i < gpus; i++)); do
  CUDA_VISIBLE_DEVICES="$i" dagster-celery worker start -A dagster_celery.app -y "$config" \
    -q dagster,gpu -n "gpu$i-$host" -- --concurrency=1 &
  pids+=($!)
done
dagster-celery worker start -A dagster_celery.app -y "$config" -q dagster -n "cpu-$host" -- --concurrency="$cpu" &
pids+=($!)
echo "started $gpus GPU worker(s) and a CPU worker of $cpu process(es) on $host" >&2
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
wait
