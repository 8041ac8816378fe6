#!/usr/bin/env bash
# fp8train on Gaudi2 nodes through Open MPI's mpirun (shipped in Habana's images), the launcher of Habana's own
# examples. Same hostfile as the DeepSpeed launcher ('HOST slots=N' is Open MPI's format too):
#
#   launch/gaudi_mpirun.sh -H launch/hostfile -- model=llama2_7b precision=fp8_smooth_gaudi2
#
# runs one process per card:
#
#   mpirun --allow-run-as-root -n TOTAL_SLOTS --bind-to core --map-by socket:PE=K --rank-by slot \
#       -hostfile HOSTFILE -wdir ROOT -x MASTER_ADDR=FIRST_HOST -x MASTER_PORT=29500 -x PT_HPU_LAZY_MODE=1 ... \
#       python3 train.py backend=hpu parallel=deepspeed ... hydra.run.dir=runs/<time>_gaudi
#
# Ranks learn RANK / LOCAL_RANK / WORLD_SIZE from mpirun's OMPI_COMM_WORLD_* variables (fp8train and Habana's
# hccl module both read them); MASTER_ADDR and MASTER_PORT are passed explicitly. K cores are bound to each rank.
set -euo pipefail

LAUNCHER=gaudi_mpirun
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

usage() {
    cat <<EOF
usage: launch/gaudi_mpirun.sh -H HOSTFILE [-p PORT] [-n NAME] [-e ENV_FILE] [-c K] [--dry-run] [--] [OVERRIDE...]

  -H, --hostfile FILE       one 'HOST slots=N' line per node (launch/hostfile.example); the first host is the
                            master; mpirun starts the sum of the slots processes
  -p, --port PORT           rank 0's port for the process group (default 29500)
  -n, --name NAME           run directory runs/<time>_NAME (default gaudi); an override hydra.run.dir=... wins
  -e, --env-file FILE       KEY=value lines for every rank (launch/gaudi_env.example), over the shell's
                            PT_HPU_*, PT_TE_*, HCCL_*, FI_* variables; PT_HPU_LAZY_MODE defaults to 1
                            (0, over any value, with backend.compile=true)
  -c, --cores-per-rank K    CPU cores bound to each rank (--map-by socket:PE=K); default: this node's physical
                            cores divided by the first host's slots
      --dry-run             print the command, start nothing (also DRY_RUN=1)
  -h, --help                this text
  OVERRIDE...               Hydra overrides for train.py (after '--'); backend=hpu parallel=deepspeed are added
                            unless given
Environment: PYTHON (default python3) is the interpreter every node runs.
EOF
}

physical_cores() {
    # Distinct (core, socket) pairs: hyperthreads do not count. Falls back to logical CPUs.
    local n
    n=$(lscpu -p=CORE,SOCKET 2>/dev/null | grep -v '^#' | sort -u | wc -l) || n=0
    ((n > 0)) || n=$(nproc)
    echo "$n"
}

hostfile="" port=29500 name=gaudi env_file="" cores=""
OVERRIDES=()
while (($#)); do
    case $1 in
    -h | --help) usage; exit 0 ;;
    -H | --hostfile) need_value "$@"; hostfile=$2; shift 2 ;;
    -p | --port) need_value "$@"; port=$2; shift 2 ;;
    -n | --name) need_value "$@"; name=$2; shift 2 ;;
    -e | --env-file) need_value "$@"; env_file=$2; shift 2 ;;
    -c | --cores-per-rank) need_value "$@"; cores=$2; shift 2 ;;
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
if [[ -z $cores ]]; then
    cores=$(($(physical_cores) / SLOTS[0]))
    ((cores > 0)) || cores=1
fi
check_positive_int "--cores-per-rank" "$cores"
gaudi_env "$env_file"
complete_overrides "runs/$(timestamp)_$name" backend=hpu parallel=deepspeed
python=${PYTHON:-python3}
require_command mpirun "run inside docker/Dockerfile.gaudi (Habana's images ship Open MPI)"

exports=(-x "MASTER_ADDR=$MASTER_HOST" -x "MASTER_PORT=$port")
for kv in "${RANK_ENV[@]}"; do exports+=(-x "$kv"); done

cd "$ROOT"
say "hostfile $HOSTFILE: ${#HOSTS[@]} node(s), $TOTAL_SLOTS rank(s), master $MASTER_HOST:$port, $cores core(s) per rank"
export_env
run mpirun --allow-run-as-root -n "$TOTAL_SLOTS" --bind-to core --map-by "socket:PE=$cores" --rank-by slot \
    -hostfile "$HOSTFILE" -wdir "$ROOT" "${exports[@]}" "$python" "$ROOT/train.py" "${OVERRIDES[@]}"
