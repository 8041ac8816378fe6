# shellcheck shell=bash
# Shared by the launchers in launch/ (sourced, never run): input checks, hostfile parsing, the environment every
# rank gets, the Hydra overrides a launcher adds, and print-then-run. Defines functions and variables only.

# Each launcher sets LAUNCHER (its name in messages) before sourcing this file.
LAUNCHER=${LAUNCHER:-$(basename "$0")}
DRY_RUN=${DRY_RUN:-0}

die() {
    # One message naming what to fix; exit status 2, as fp8train uses for configuration errors.
    printf '%s: error: %s\n' "$LAUNCHER" "$*" >&2
    exit 2
}

say() { printf '[%s] %s\n' "$LAUNCHER" "$*"; }

[[ $DRY_RUN == [01] ]] || die "DRY_RUN must be 0 or 1, got '$DRY_RUN'"

need_value() {
    # need_value OPTION "$@": the option's value must follow it.
    [[ $# -ge 2 && -n $2 && $2 != -* ]] || die "option $1 needs a value (see -h)"
}

is_count() {
    # is_count VALUE [MAX]: VALUE is an integer in 1..MAX (no MAX: any positive integer), written plainly.
    [[ $1 =~ ^[1-9][0-9]{0,8}$ ]] && ((${2:-0} == 0 || $1 <= ${2:-0}))
}

check_positive_int() {
    # check_positive_int WHAT VALUE
    is_count "$2" || die "$1 must be a positive integer, got '$2'"
}

check_port() {
    is_count "$1" 65535 || die "port must be an integer in 1..65535, got '$1'"
}

check_name() {
    [[ $1 =~ ^[A-Za-z0-9._-]+$ ]] || die "name '$1' may only hold letters, digits, '.', '_' and '-' (it names the run directory)"
}

find_root() {
    # ROOT: the fp8train checkout that holds train.py (FP8TRAIN_ROOT, else the given default).
    ROOT=${FP8TRAIN_ROOT:-$1}
    [[ -f $ROOT/train.py ]] ||
        die "train.py not found in '$ROOT': run the launcher from an fp8train checkout, or set FP8TRAIN_ROOT to one"
    ROOT=$(cd "$ROOT" && pwd)
}

require_command() {
    # require_command NAME HINT: skipped in a dry run, which starts nothing.
    [[ $DRY_RUN == 1 ]] || command -v "$1" >/dev/null || die "$1 not found on PATH: $2"
}

read_hostfile() {
    # read_hostfile FILE -> HOSTFILE (absolute), HOSTS, SLOTS, TOTAL_SLOTS, MASTER_HOST.
    # One node per line, 'HOST slots=N' (N = devices used on that host), the format DeepSpeed and Open MPI share.
    # Blank lines and '#' comments are skipped. The first host is rank 0's node, hence the master address.
    local file=$1 n=0 raw line host rest slots seen=" "
    [[ -n $file ]] || die "no hostfile: pass -H FILE with one 'HOST slots=N' line per node (see launch/hostfile.example)"
    [[ -f $file ]] || die "hostfile '$file' not found: pass -H FILE with one 'HOST slots=N' line per node (see launch/hostfile.example)"
    HOSTFILE=$(cd "$(dirname "$file")" && pwd)/$(basename "$file")
    HOSTS=() SLOTS=() TOTAL_SLOTS=0
    while IFS= read -r raw || [[ -n $raw ]]; do
        n=$((n + 1))
        line=${raw%%#*}
        line=${line//$'\r'/}
        read -r host rest <<<"$line" || true
        [[ -z $host ]] && continue
        [[ $rest =~ ^slots=([^[:space:]]*)$ ]] ||
            die "$file line $n: '${raw//$'\r'/}' is not 'HOST slots=N' (e.g. 'gaudi-node-1 slots=8')"
        slots=${BASH_REMATCH[1]}
        is_count "$slots" ||
            die "$file line $n: slots=$slots must be a positive integer (the devices to use on $host, e.g. slots=8)"
        [[ $seen == *" $host "* ]] && die "$file line $n: host $host is listed twice (one line per node)"
        seen+="$host "
        HOSTS+=("$host")
        SLOTS+=("$slots")
        TOTAL_SLOTS=$((TOTAL_SLOTS + slots))
    done <"$file"
    ((${#HOSTS[@]} > 0)) || die "hostfile '$file' lists no hosts: add one 'HOST slots=N' line per node"
    MASTER_HOST=${HOSTS[0]}
}

collect_env() {
    # collect_env ENV_FILE PREFIX... -> RANK_ENV: the KEY=value pairs every rank gets: the launching shell's
    # variables whose names start with a PREFIX, then the lines of ENV_FILE (-e; optional), which win. Values go
    # unquoted into DeepSpeed's remote shell command, so they may not hold spaces or quotes.
    local file=$1 line key val n=0 prefix
    shift
    local -A value=()
    local -a order=()
    local -a names
    mapfile -t names < <(compgen -e | LC_ALL=C sort)
    for key in "${names[@]}"; do
        for prefix in "$@"; do
            if [[ $key == "$prefix"* ]]; then
                order+=("$key")
                value[$key]=${!key}
                break
            fi
        done
    done
    if [[ -n $file ]]; then
        [[ -f $file ]] || die "env file '$file' not found (-e FILE: KEY=value lines, see launch/gaudi_env.example)"
        while IFS= read -r line || [[ -n $line ]]; do
            n=$((n + 1))
            line=${line//$'\r'/}
            line=${line#"${line%%[![:space:]]*}"}
            [[ -z $line || $line == \#* ]] && continue
            [[ $line =~ ^([A-Za-z_][A-Za-z0-9_]*)=([^[:space:]\"\']*)$ ]] ||
                die "$file line $n: '$line' is not KEY=value (no spaces or quotes; comments on lines of their own)"
            key=${BASH_REMATCH[1]}
            val=${BASH_REMATCH[2]}
            [[ -v value[$key] ]] || order+=("$key")
            value[$key]=$val
        done <"$file"
    fi
    RANK_ENV=()
    for key in "${order[@]}"; do
        [[ ${value[$key]} =~ [[:space:]\"\'] ]] &&
            die "\$$key='${value[$key]}' holds spaces or quotes, which DeepSpeed cannot pass to other nodes"
        RANK_ENV+=("$key=${value[$key]}")
    done
}

default_env() {
    # default_env KEY VALUE: put KEY=VALUE first in RANK_ENV unless it is already there.
    local kv
    for kv in "${RANK_ENV[@]}"; do [[ ${kv%%=*} == "$1" ]] && return 0; done
    RANK_ENV=("$1=$2" "${RANK_ENV[@]}")
}

compiling() {
    # Does OVERRIDES ask for backend.compile=true (a value Hydra/OmegaConf reads as true)?
    local o
    for o in "${OVERRIDES[@]}"; do
        o=${o#+}
        o=${o#+}
        [[ ${o,,} =~ ^backend\.compile=(true|yes|on|y|1)$ ]] && return 0
    done
    return 1
}

gaudi_env() {
    # gaudi_env ENV_FILE -> RANK_ENV for the Gaudi launchers: PT_HPU_LAZY_MODE=1 unless set, the shell's PT_HPU_*,
    # PT_TE_*, HCCL_*, FI_* variables, ENV_FILE's lines; and with HCCL_OVER_OFI, the shell's LD_LIBRARY_PATH, as
    # Habana's own launchers pass it (libfabric must load on every node). With backend.compile=true in OVERRIDES
    # (read them first), PT_HPU_LAZY_MODE=0 whatever the shell says (docker/Dockerfile.gaudi sets 1): fp8train
    # refuses torch.compile in lazy mode.
    local kv
    collect_env "$1" PT_HPU_ PT_TE_ HCCL_ FI_
    if compiling; then
        for kv in "${!RANK_ENV[@]}"; do [[ ${RANK_ENV[$kv]%%=*} == PT_HPU_LAZY_MODE ]] && unset "RANK_ENV[$kv]"; done
        RANK_ENV=("${RANK_ENV[@]}")
    fi
    default_env PT_HPU_LAZY_MODE "$(compiling && echo 0 || echo 1)"
    for kv in "${RANK_ENV[@]}"; do
        if [[ ${kv%%=*} == HCCL_OVER_OFI && -n ${LD_LIBRARY_PATH:-} ]]; then
            default_env LD_LIBRARY_PATH "$LD_LIBRARY_PATH"
            break
        fi
    done
}

export_env() {
    # The launching process passes RANK_ENV on to the ranks it starts on this node.
    local kv
    for kv in "${RANK_ENV[@]}"; do export "${kv?}"; done
}

show_env() {
    # show_env TITLE: print RANK_ENV.
    local kv
    say "$1"
    ((${#RANK_ENV[@]} > 0)) || printf '    (nothing)\n'
    for kv in "${RANK_ENV[@]}"; do printf '    %s\n' "$kv"; done
}

has_override() {
    # has_override KEY: is there a Hydra override KEY=... (also +KEY= / ++KEY=) in OVERRIDES?
    local o
    for o in "${OVERRIDES[@]}"; do
        o=${o#+}
        o=${o#+}
        [[ $o == "$1="* ]] && return 0
    done
    return 1
}

complete_overrides() {
    # complete_overrides RUN_DIR KEY=VALUE...: the launcher's defaults go before the user's overrides, each unless
    # the user set that key; hydra.run.dir=RUN_DIR goes last unless set. Every rank must get the same run
    # directory, so it is fixed here, once, instead of from each rank's clock.
    local run_dir=$1 kv
    shift
    local -a defaults=()
    for kv in "$@"; do has_override "${kv%%=*}" || defaults+=("$kv"); done
    has_override hydra.run.dir || OVERRIDES+=("hydra.run.dir=$run_dir")
    OVERRIDES=("${defaults[@]}" "${OVERRIDES[@]}")
}

timestamp() { date +%Y-%m-%d_%H-%M-%S; }

run_deepspeed() {
    # run_deepspeed PORT: the DeepSpeed launcher over HOSTFILE's nodes (read_hostfile first), from ROOT. It ssh-es
    # (pdsh) to every host, starts SLOTS processes there and exports the lines of ./.deepspeed_env on each node, so
    # RANK_ENV is written there (KEY=value lines: DeepSpeed's reader allows no comments or blank lines).
    local port=$1 where="$ROOT/.deepspeed_env"
    cd "$ROOT" || die "cannot enter $ROOT"
    say "hostfile $HOSTFILE: ${#HOSTS[@]} node(s), $TOTAL_SLOTS rank(s), master $MASTER_HOST:$port"
    if [[ $DRY_RUN == 1 ]]; then
        show_env "environment of every rank (would be written to $where):"
    else
        : >"$where"
        ((${#RANK_ENV[@]} == 0)) || printf '%s\n' "${RANK_ENV[@]}" >"$where"
        show_env "environment of every rank (written to $where):"
    fi
    export_env
    run deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_HOST" --master_port "$port" --no_local_rank \
        "$ROOT/train.py" "${OVERRIDES[@]}"
}

run() {
    # run CMD...: print the exact command (shell-quoted, copy-pasteable) on a line of its own, then exec it,
    # unless this is a dry run.
    local line
    printf -v line '%q ' "$@"
    if [[ $DRY_RUN == 1 ]]; then
        say "command (dry run, not started):"
    else
        say "command:"
    fi
    printf '%s\n' "${line% }"
    [[ $DRY_RUN == 1 ]] && exit 0
    exec "$@"
}
