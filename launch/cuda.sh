#!/usr/bin/env bash
# fp8train on NVIDIA GPU nodes (NCCL), one process per GPU, three ways:
#
#   launch/cuda.sh -- model=llama_1b                        # this node, all GPUs: torchrun --standalone
#   launch/cuda.sh --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 -- hydra.run.dir=runs/mine ...
#                                                           # torchrun, the same command on every node (rank 0..N-1)
#   launch/cuda.sh -H launch/hostfile -- model=llama_1b     # from one node, over ssh: the DeepSpeed launcher
#
# torchrun and DeepSpeed both set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process.
set -euo pipefail

LAUNCHER=cuda
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

usage() {
    cat <<EOF
usage: launch/cuda.sh [-g GPUS] [--nnodes N --node-rank R --master-addr ADDR | -H HOSTFILE]
                      [-p PORT] [-n NAME] [-e ENV_FILE] [--dry-run] [--] [OVERRIDE...]

  -g, --gpus N          processes (GPUs) per node for torchrun (default: the GPUs nvidia-smi lists)
      --nnodes N        torchrun over N nodes: run the same command on each, with its --node-rank, and give
                        hydra.run.dir=... yourself (a run directory from each node's clock would differ)
      --node-rank R     this node's index, 0..N-1 (0 is the master)
      --master-addr A   address of the node with --node-rank 0
  -H, --hostfile FILE   DeepSpeed launcher instead of torchrun: one 'HOST slots=N' line per node
                        (launch/hostfile.example), started from here over ssh; the first host is the master
  -p, --port PORT       rank 0's port for the process group (default 29500)
  -n, --name NAME       run directory runs/<time>_NAME (default cuda); an override hydra.run.dir=... wins
  -e, --env-file FILE   KEY=value lines for every rank (launch/cuda_env.example), over the shell's NCCL_*
                        variables
      --dry-run         print the command, start nothing (also DRY_RUN=1)
  -h, --help            this text
  OVERRIDE...           Hydra overrides for train.py (after '--'); backend=cuda parallel=deepspeed are added
                        unless given
EOF
}

gpus="" nnodes=1 node_rank="" master_addr="" hostfile="" port=29500 name=cuda env_file=""
OVERRIDES=()
while (($#)); do
    case $1 in
    -h | --help) usage; exit 0 ;;
    -g | --gpus) need_value "$@"; gpus=$2; shift 2 ;;
    --nnodes) need_value "$@"; nnodes=$2; shift 2 ;;
    --node-rank) need_value "$@"; node_rank=$2; shift 2 ;;
    --master-addr) need_value "$@"; master_addr=$2; shift 2 ;;
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
check_port "$port"
check_name "$name"
check_positive_int "--nnodes" "$nnodes"
collect_env "$env_file" NCCL_
user_run_dir=0
has_override hydra.run.dir && user_run_dir=1
complete_overrides "runs/$(timestamp)_$name" backend=cuda parallel=deepspeed

if [[ -n $hostfile ]]; then # DeepSpeed launcher over the hostfile's nodes
    [[ -z $gpus && $nnodes == 1 && -z $node_rank && -z $master_addr ]] ||
        die "-H takes the nodes and GPUs from the hostfile: drop -g/--nnodes/--node-rank/--master-addr"
    read_hostfile "$hostfile"
    require_command deepspeed "pip install deepspeed (docker/Dockerfile has it)"
    run_deepspeed "$port"
fi

if ((nnodes == 1)); then
    [[ -z $node_rank && -z $master_addr ]] || die "--node-rank/--master-addr need --nnodes N with N > 1"
    rendezvous=(--standalone)
    where="this node"
else
    [[ -n $master_addr ]] || die "--nnodes $nnodes needs --master-addr (the address of node 0)"
    if ! [[ $node_rank =~ ^(0|[1-9][0-9]{0,8})$ ]] || ((node_rank >= nnodes)); then
        die "--nnodes $nnodes needs --node-rank R with R in 0..$((nnodes - 1)), got '$node_rank'"
    fi
    ((user_run_dir)) ||
        die "--nnodes $nnodes starts each node separately: pass hydra.run.dir=runs/NAME, the same on every node"
    rendezvous=(--nnodes="$nnodes" --node_rank="$node_rank" --master_addr="$master_addr" --master_port="$port")
    where="node $node_rank of $nnodes (master $master_addr:$port)"
fi
if [[ -z $gpus ]]; then
    command -v nvidia-smi >/dev/null || die "nvidia-smi not found: pass -g GPUS (processes per node)"
    gpus=$(nvidia-smi -L | grep -c '^GPU ') || true
    ((gpus > 0)) || die "nvidia-smi lists no GPU: pass -g GPUS (processes per node)"
fi
check_positive_int "--gpus" "$gpus"
require_command torchrun "install PyTorch (docker/Dockerfile has it)"
cd "$ROOT"
say "$where: $gpus rank(s), $((nnodes * gpus)) in all"
show_env "environment of every rank:"
export_env
run torchrun "${rendezvous[@]}" --nproc_per_node="$gpus" "$ROOT/train.py" "${OVERRIDES[@]}"
