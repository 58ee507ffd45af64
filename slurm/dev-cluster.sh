#!/usr/bin/env bash
# A real Slurm on this one machine, from the Debian packages (slurm-wlm, munge), for development
# and the tests. Everything it makes lives under $CIFAR_DIST_SLURM_DIR (default
# /tmp/cifar-dist-slurm); the config is found through SLURM_CONF, never in /etc/slurm.
#
#   slurm/dev-cluster.sh up [--nodes N]   start (or restart in the asked shape); idempotent
#   slurm/dev-cluster.sh down             stop every daemon and remove what `up` made
#   slurm/dev-cluster.sh status           daemons and `sinfo`
#   slurm/dev-cluster.sh env              `export SLURM_CONF=...` for eval in a shell
#
# --nodes 1 (default): one node named after this machine with all its cores.
# --nodes N > 1: N nodes node1..nodeN, each slurmd in its own network namespace (own address on a
# bridge) and UTS namespace (own hostname), one controller in the root namespace; the cores are
# split between them (2 cores -> 2 single-CPU nodes). Needs root, `ip`, `nsenter`, `unshare`.
set -euo pipefail

DIR=${CIFAR_DIST_SLURM_DIR:-/tmp/cifar-dist-slurm}
CONF=$DIR/slurm.conf
SUBNET=${CIFAR_DIST_SLURM_SUBNET:-10.200.0}   # /24 of the bridge: .1 = controller, .1N = nodeN
BRIDGE=cdsl-br0                               # interface names must stay under 16 characters
NS_PREFIX=cdsl-node                           # network namespaces cdsl-node1, cdsl-node2, ...
HOSTS_TAG="# cifar-dist-slurm"                # marks the /etc/hosts lines this script owns
CONTROLLER=$(hostname)

say() { echo "dev-cluster: $*"; }
die() { echo "dev-cluster: error: $*" >&2; exit 1; }

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

need_tools() {
    [[ $(id -u) == 0 ]] || die "must run as root (slurmd, munged and network namespaces need it)"
    local t
    for t in slurmctld slurmd munged sinfo scontrol; do
        command -v "$t" >/dev/null || die "$t not found: apt-get install -y slurm-wlm munge"
    done
}

# ------------------------------------------------------------------------------ munge

munge_works() { command -v munge >/dev/null && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_works; then
        return
    fi
    mkdir -p /run/munge
    chown munge:munge /run/munge
    [[ -f /etc/munge/munge.key ]] || die "/etc/munge/munge.key missing (reinstall the munge package)"
    runuser -u munge -- /usr/sbin/munged
    touch "$DIR/munged.ours"   # `down` stops munged only when this script started it
    for _ in $(seq 50); do munge_works && return; sleep 0.1; done
    die "munged did not start"
}

# ------------------------------------------------------------------------------ config

write_conf() {
    local nodes=$1 cpus mem_mb total_mb
    total_mb=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
    cpus=$(( $(nproc) / nodes )); (( cpus >= 1 )) || cpus=1
    mem_mb=$(( total_mb * 8 / 10 / nodes ))   # leave a fifth of the memory to the machine
    {
        echo "# Written by slurm/dev-cluster.sh up --nodes $nodes; removed by 'down'."
        echo "ClusterName=cifardist"
        if (( nodes == 1 )); then
            echo "SlurmctldHost=$CONTROLLER"
        else
            echo "SlurmctldHost=$CONTROLLER($SUBNET.1)"
        fi
        cat <<EOF
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job that asks for no memory gets its share per CPU (the default would be the whole node,
# and then only one job per node could run).
DefMemPerCPU=$(( mem_mb / cpus ))
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
# Seconds between SIGTERM and SIGKILL at cancel/time-out: short, but long enough for a checkpoint.
KillWait=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
EOF
        if (( nodes == 1 )); then
            echo "NodeName=$CONTROLLER CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
            echo "PartitionName=debug Nodes=$CONTROLLER Default=YES MaxTime=INFINITE State=UP"
        else
            local i
            for i in $(seq "$nodes"); do
                echo "NodeName=node$i NodeHostname=node$i NodeAddr=$SUBNET.1$i CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
            done
            echo "PartitionName=debug Nodes=node[1-$nodes] Default=YES MaxTime=INFINITE State=UP"
        fi
    } >"$CONF"
    echo "$nodes" >"$DIR/nodes"
}

# ------------------------------------------------------------------------------ network (N > 1)

hosts_add() {
    local nodes=$1 i tmp
    hosts_remove
    tmp=$(mktemp)
    cat /etc/hosts >"$tmp"
    echo "$SUBNET.1 $CONTROLLER-ctl $HOSTS_TAG" >>"$tmp"
    for i in $(seq "$nodes"); do echo "$SUBNET.1$i node$i $HOSTS_TAG" >>"$tmp"; done
    cat "$tmp" >/etc/hosts   # rewrite in place: /etc/hosts may be a bind mount that cannot be replaced
    rm -f "$tmp"
}

hosts_remove() {
    local tmp
    grep -q -- "$HOSTS_TAG" /etc/hosts 2>/dev/null || return 0
    tmp=$(mktemp)
    grep -v -- "$HOSTS_TAG" /etc/hosts >"$tmp" || true
    cat "$tmp" >/etc/hosts
    rm -f "$tmp"
}

net_up() {
    local nodes=$1 i ns
    ip link add "$BRIDGE" type bridge
    ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for i in $(seq "$nodes"); do
        ns=$NS_PREFIX$i
        ip netns add "$ns"
        ip link add "cdsl-v$i" type veth peer name "cdsl-p$i"
        ip link set "cdsl-v$i" master "$BRIDGE"
        ip link set "cdsl-v$i" up
        ip link set "cdsl-p$i" netns "$ns"
        ip -n "$ns" link set "cdsl-p$i" name eth0
        ip -n "$ns" addr add "$SUBNET.1$i/24" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
    done
    hosts_add "$nodes"
}

net_down() {
    local ns i
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NS_PREFIX" || true); do
        ip netns delete "$ns" 2>/dev/null || true
    done
    for i in $(seq 16); do ip link delete "cdsl-v$i" 2>/dev/null || true; done
    ip link delete "$BRIDGE" 2>/dev/null || true
    hosts_remove
}

# ------------------------------------------------------------------------------ daemons

env_of() { cat "/proc/$1/environ" 2>/dev/null | tr '\0' '\n'; }

# Processes that belong to this cluster: its daemons and job steps (all started with our SLURM_CONF).
our_pids() {
    local p comm
    for p in /proc/[0-9]*; do
        comm=$(cat "$p/comm" 2>/dev/null) || continue
        case $comm in
            slurmctld|slurmd|slurmstepd) ;;
            *) continue ;;
        esac
        if env_of "${p#/proc/}" | grep -qx "SLURM_CONF=$CONF"; then
            echo "${p#/proc/}"
        fi
    done
}

# Job processes (tasks and batch scripts) still alive after their slurmstepd is gone.
job_pids() {
    local p
    for p in /proc/[0-9]*; do
        [[ ${p#/proc/} == "$$" ]] && continue
        local e
        e=$(env_of "${p#/proc/}")
        if grep -qx "SLURM_CONF=$CONF" <<<"$e" && grep -q "^SLURM_JOB_ID=" <<<"$e"; then
            echo "${p#/proc/}"
        fi
    done
}

kill_all() {   # kill_all PID... : TERM, wait up to 5 s, then KILL
    (( $# )) || return 0
    kill -TERM "$@" 2>/dev/null || true
    for _ in $(seq 50); do
        local alive=0 p
        for p in "$@"; do [[ -d /proc/$p ]] && alive=1; done
        (( alive )) || return 0
        sleep 0.1
    done
    kill -KILL "$@" 2>/dev/null || true
}

start_daemons() {
    local nodes=$1 i
    export SLURM_CONF=$CONF
    slurmctld
    if (( nodes == 1 )); then
        mkdir -p "$DIR/spool-$CONTROLLER"
        slurmd
    else
        for i in $(seq "$nodes"); do
            mkdir -p "$DIR/spool-node$i"
            # nsenter, not `ip netns exec`: that remounts /sys and slurmd then dies on the cgroup
            # mounts. A UTS namespace gives the node (and every task it starts) its own hostname.
            nsenter --net="/var/run/netns/$NS_PREFIX$i" unshare --uts \
                sh -c 'hostname "$1" && exec slurmd -N "$1"' sh "node$i"
        done
    fi
}

wait_idle() {
    local nodes=$1 states
    for _ in $(seq 150); do
        states=$(SLURM_CONF=$CONF sinfo -h -N -o '%T' 2>/dev/null || true)
        if [[ $(grep -c '^idle' <<<"$states") == "$nodes" ]]; then
            return 0
        fi
        sleep 0.2
    done
    echo "--- sinfo:" >&2; SLURM_CONF=$CONF sinfo -N >&2 || true
    echo "--- slurmctld.log:" >&2; tail -20 "$DIR/slurmctld.log" >&2 2>/dev/null || true
    die "nodes not idle after 30 s (logs in $DIR)"
}

healthy() {   # healthy N: a cluster of N nodes is up and every node idle or busy
    [[ -f $DIR/nodes && $(cat "$DIR/nodes") == "$1" ]] || return 1
    local states
    states=$(SLURM_CONF=$CONF timeout 10 sinfo -h -N -o '%T' 2>/dev/null) || return 1
    [[ $(grep -cE '^(idle|mixed|allocated)$' <<<"$states") == "$1" ]]
}

# ------------------------------------------------------------------------------ commands

cmd_up() {
    local nodes=1
    while (( $# )); do
        case $1 in
            --nodes) nodes=${2:-}; shift 2 || usage ;;
            --nodes=*) nodes=${1#--nodes=}; shift ;;
            *) usage ;;
        esac
    done
    [[ $nodes =~ ^[1-8]$ ]] || die "--nodes must be 1..8, got '$nodes'"
    need_tools
    if (( nodes > 1 )); then
        for t in ip nsenter unshare; do command -v "$t" >/dev/null || die "$t not found (apt-get install -y iproute2 util-linux)"; done
    fi
    if healthy "$nodes"; then
        say "already up with $nodes node(s); $(cmd_env)"
        return 0
    fi
    cmd_down >/dev/null   # whatever is left of an earlier cluster, crashed or of another shape
    mkdir -p "$DIR/state"
    start_munge
    write_conf "$nodes"
    (( nodes == 1 )) || net_up "$nodes"
    start_daemons "$nodes"
    wait_idle "$nodes"
    say "up: $nodes node(s), partition debug; $(cmd_env)"
}

cmd_down() {
    if [[ -f $CONF ]] && command -v scancel >/dev/null; then
        local ids
        ids=$(SLURM_CONF=$CONF timeout 10 squeue -h -o '%A' 2>/dev/null | sort -u || true)
        # shellcheck disable=SC2086
        [[ -z $ids ]] || SLURM_CONF=$CONF timeout 10 scancel $ids 2>/dev/null || true
    fi
    # shellcheck disable=SC2046
    kill_all $(our_pids)
    # shellcheck disable=SC2046
    kill_all $(job_pids)
    net_down
    if [[ -f $DIR/munged.ours && -f /run/munge/munged.pid ]]; then
        kill_all "$(cat /run/munge/munged.pid)"
    fi
    rm -rf "$DIR"
    say "down"
}

cmd_status() {
    if [[ ! -f $CONF ]]; then
        say "down (no $CONF)"
        return 3
    fi
    local pids
    pids=$(our_pids | tr '\n' ' ')
    say "config $CONF ($(cat "$DIR/nodes" 2>/dev/null || echo '?') node(s)); daemon and step pids: ${pids:-none}"
    SLURM_CONF=$CONF sinfo -N || return 3
    SLURM_CONF=$CONF squeue
}

cmd_env() {
    echo "export SLURM_CONF=$CONF"
}

case ${1:-} in
    up) shift; cmd_up "$@" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) usage ;;
esac
