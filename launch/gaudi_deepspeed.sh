#!/usr/bin/env bash
# fp8train on Gaudi2 nodes through the DeepSpeed launcher (Habana's fork, in docker/Dockerfile.gaudi).
#
#   launch/gaudi_deepspeed.sh -H launch/hostfile -- model=llama2_7b precision=fp8_smooth_gaudi2 precision.engine=te
#
# runs, from the checkout's root:
#
#   deepspeed --hostfile HOSTFILE --master_addr FIRST_HOST --master_port 29500 --no_local_rank \
#       train.py backend=hpu parallel=deepspeed ... hydra.run.dir=runs/<time>_gaudi
#
# DeepSpeed reaches the other nodes with pdsh over ssh (passwordless, same checkout path on every node; in
# containers, sshd on a port set in ~/.ssh/config) and starts one process per card, each with RANK, LOCAL_RANK,
# WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. Variables for every rank (PT_HPU_LAZY_MODE, HCCL_*, ...) are written
# to .deepspeed_env in the checkout's root, the file DeepSpeed exports on every node; see launch/README.md.
set -euo pipefail

LAUNCHER=gaudi_deepspeed
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

usage() {
    cat <<EOF
usage: launch/gaudi_deepspeed.sh -H HOSTFILE [-p PORT] [-n NAME] [-e ENV_FILE] [--dry-run] [--] [OVERRIDE...]

  -H, --hostfile FILE   one 'HOST slots=N' line per node (launch/hostfile.example); the first host is the master
  -p, --port PORT       rank 0's port for the process group (default 29500)
  -n, --name NAME       run directory runs/<time>_NAME (default gaudi); an override hydra.run.dir=... wins
  -e, --env-file FILE   KEY=value lines for every rank (launch/gaudi_env.example), over the shell's
                        PT_HPU_*, PT_TE_*, HCCL_*, FI_* variables; PT_HPU_LAZY_MODE defaults to 1
                        (0, over any value, with backend.compile=true)
      --dry-run         print .deepspeed_env and the command, start nothing (also DRY_RUN=1)
  -h, --help            this text
  OVERRIDE...           Hydra overrides for train.py (after '--'); backend=hpu parallel=deepspeed are added
                        unless given
EOF
}

hostfile="" port=29500 name=gaudi env_file=""
OVERRIDES=()
while (($#)); do
    case $1 in
    -h | --help) usage; exit 0 ;;
    -H | --hostfile) need_value "$@"; hostfile=$2; shift 2 ;;
    -p | --port) need_value "$@"; port=$2; shift 2 ;;
    -n | --name) need_value "$@"; name=$2; shift 2 ;;
    -e | --env-file) need_value "$@"; env_file=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    -*) die "unknown option '$1' (Hydra overrides go after '--'; see -h)" ;;
    *) OVERRIDES+=("$1"); shift ;;
    esac
done

find_root "$(dirname "$HERE")"
read_hostfile "$hostfile"
check_port "$port"
check_name "$name"
gaudi_env "$env_file"
complete_overrides "runs/$(timestamp)_$name" backend=hpu parallel=deepspeed
require_command deepspeed "run inside docker/Dockerfile.gaudi, which installs Habana's DeepSpeed fork"

run_deepspeed "$port"
