#!/usr/bin/env bash
# Runs cvgl_jax.main on every worker of a Cloud TPU VM pod slice (e.g. a
# v4-32: 4 hosts) as one multi-process run. Each worker runs the same
# command with --distributed=on, and jax.distributed.initialize() learns the
# coordinator, the process count and its own index from the TPU metadata.
#
# Usage:
#   launch/tpu_pod.sh TPU_NAME ZONE MAIN_ARGS...
#   launch/tpu_pod.sh my-v4-32 us-central2-b \
#       --config=configs/cvusa_unsup.py --config.data.root=/mnt/data/CVUSA \
#       --workdir=/mnt/shared/runs/cvusa_unsup
#
# Before: the repository at the same path on every worker, installed with
# its TPU extra, e.g.
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all \
#     --command='git clone REPO ~/cvgl_jax && pip install -e ~/cvgl_jax[tpu]'
# The workdir (and a data root every host reads) must be one shared file
# system mounted at the same path on all workers (e.g. Filestore over NFS):
# process 0 writes the logs, metrics and generated files there and orbax
# writes every host's share of the checkpoints there.
#
# The run is started detached on every worker (nohup, its own session): a
# dropped ssh connection or a closed laptop does not end it. Each worker
# logs to LOG_DIR/worker_<hostname>.log on that worker (default
# ~/cvgl_jax_logs); watch one with
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=0 \
#     --command='tail -f ~/cvgl_jax_logs/worker_*.log'
# FOREGROUND=1 streams every worker's output here instead (the old way).
# A maintenance event sends SIGTERM: every process checkpoints at the step
# they agree on and exits 0; run this script again to resume.
#
# Environment: PROJECT (gcloud project; default the configured one),
# REPO_DIR (on the workers, default ~/cvgl_jax), PYTHON (default python3),
# LOG_DIR (on the workers, default ~/cvgl_jax_logs), FOREGROUND.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
tpu=$1
zone=$2
shift 2
repo=${REPO_DIR:-'~/cvgl_jax'}
python=${PYTHON:-python3}
# Quote every argument for the remote shell.
args=$(printf ' %q' "$@")

logs=${LOG_DIR:-'~/cvgl_jax_logs'}
run="cd $repo && $python -m cvgl_jax.main --distributed=on$args"
if [[ -z "${FOREGROUND:-}" ]]; then
  run="mkdir -p $logs && nohup setsid bash -c $(printf '%q' "$run") \
> $logs/worker_\$(hostname).log 2>&1 < /dev/null & echo started on \$(hostname)"
fi
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" \
  ${PROJECT:+--project="$PROJECT"} --worker=all --command="$run"
