#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying `cluster=slurm_cpu` (and the tests marked
# `slurm`) without a real cluster:
#
#   scripts/slurm/local_cluster.sh start    # install slurm-wlm + munge if missing, start, wait until idle
#   export SLURM_CONF=/tmp/gmeta-slurm/slurm.conf    # the line `start` prints (clients need it)
#   python train.py -m +experiment=synthetic_maml cluster=slurm_cpu meta=maml,fomaml
#   scripts/slurm/local_cluster.sh status
#   scripts/slurm/local_cluster.sh stop     # cancels its jobs, ends the daemons it started
#
# Everything lives in ${GMETA_SLURM_DIR:-/tmp/gmeta-slurm}: slurm.conf, a private munge key and
# socket, state and spool folders, logs, and the pid files `stop` reads (it ends nothing else).
# The node is this machine (`slurmd -C`: its CPUs and memory) with one partition, `cpu`. Jobs run as
# the user who submits them; the daemons run as root (start needs root, and apt-get when the
# packages are missing: Debian/Ubuntu). No accounting database: `sacct` is unavailable here, so
# finished jobs are looked up with `scontrol show job` (kept for MinJobAge=3600 s).
set -euo pipefail

DIR="${GMETA_SLURM_DIR:-/tmp/gmeta-slurm}"
CONF="$DIR/slurm.conf"
MUNGE_SOCKET="$DIR/munge/munge.socket"
CTLD_PORT="${GMETA_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${GMETA_SLURM_SLURMD_PORT:-6818}"
START_TIMEOUT_S="${GMETA_SLURM_START_TIMEOUT_S:-60}"
PARTITION=cpu

die() { echo "local_cluster.sh: error: $*" >&2; exit 1; }
say() { echo "local_cluster.sh: $*" >&2; }

pid_alive() {  # pid_alive <pidfile>: the daemon the file names (munged, slurmctld, slurmd) is running
  local pid name
  [[ -s "$1" ]] || return 1
  pid="$(cat "$1")"
  name="$(basename "$1" .pid)"
  # the same program, not another process that reused a stale pid
  [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]]
}

install_packages() {
  local missing=()
  for cmd in munged slurmctld slurmd sbatch; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install slurm-wlm and munge"
  [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}: run as root (apt-get install slurm-wlm munge)"
  say "installing slurm-wlm and munge (apt-get; missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  if ! timeout 300 apt-get install -y -q --no-install-recommends slurm-wlm munge >"$DIR/apt.log" 2>&1; then
    timeout 300 apt-get update -q >>"$DIR/apt.log" 2>&1 || true
    timeout 300 apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$DIR/apt.log" 2>&1 ||
      die "apt-get install slurm-wlm munge failed: see $DIR/apt.log"
  fi
}

write_config() {
  local node_line host
  host="$(hostname -s)"
  # slurmd -C: this machine's NodeName, CPUs, sockets/cores/threads and RealMemory, as slurmd sees them
  node_line="$(slurmd -C | head -1)"
  [[ "$node_line" == NodeName=* ]] || die "slurmd -C printed no node line: '$node_line'"
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/munge"
  cat >"$CONF" <<EOF
# written by scripts/slurm/local_cluster.sh: a one-node cluster on $host
ClusterName=gmeta-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
# no cgroups in containers: track processes by parent pid, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# finished jobs stay visible to scontrol/squeue for an hour (there is no sacct here)
MinJobAge=3600
# a cancelled or requeued job's processes get SIGTERM, then SIGKILL after KillWait seconds
KillWait=10
MessageTimeout=5
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  pid_alive "$DIR/munged.pid" && return 0
  if [[ ! -s "$DIR/munge/munge.key" ]]; then
    (umask 077 && dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none)
  fi
  chmod 700 "$DIR/munge"
  # --force: munged refuses to run as root (and with a key owned by root) without it
  munged --force --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed" ||
    die "munged did not start: see $DIR/log/munged.log"
}

wait_idle() {
  local host deadline state=""
  host="$(hostname -s)"
  deadline=$((SECONDS + START_TIMEOUT_S))
  while ((SECONDS < deadline)); do
    state="$(SLURM_CONF="$CONF" timeout 5 sinfo -h -n "$host" -o %T 2>/dev/null | head -1 || true)"
    if [[ "$state" == idle* || "$state" == mixed* || "$state" == allocated* ]]; then
      return 0
    fi
    sleep 1
  done
  die "node $host not idle after ${START_TIMEOUT_S} s (state: '${state:-no answer}'); see $DIR/log/slurmctld.log and $DIR/log/slurmd.log"
}

cmd_start() {
  [[ $(id -u) -eq 0 ]] || die "start needs root (it starts munged, slurmctld and slurmd)"
  mkdir -p "$DIR"
  install_packages
  if pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd.pid"; then
    say "already running (pids $(cat "$DIR/slurmctld.pid") $(cat "$DIR/slurmd.pid"))"
  else
    write_config
    start_munge
    pid_alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF" -c ||
      die "slurmctld did not start: see $DIR/log/slurmctld.log"
    pid_alive "$DIR/slurmd.pid" || slurmd -f "$CONF" || die "slurmd did not start: see $DIR/log/slurmd.log"
  fi
  wait_idle
  echo "export SLURM_CONF=$CONF" >"$DIR/env.sh"
  say "cluster up: partition $PARTITION on $(hostname -s); clients need:"
  echo "export SLURM_CONF=$CONF"
}

stop_pidfile() {  # stop_pidfile <name> <pidfile>: TERM, wait up to 10 s, then KILL
  local name="$1" file="$2" pid
  pid_alive "$file" || { rm -f "$file"; return 0; }
  pid="$(cat "$file")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then
    say "$name (pid $pid) still running after 10 s: killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

cmd_stop() {
  if pid_alive "$DIR/slurmctld.pid"; then
    # this cluster's jobs first, so no job step outlives the daemons; bounded wait
    SLURM_CONF="$CONF" timeout 10 scancel --partition="$PARTITION" 2>/dev/null || true
    for _ in $(seq 30); do
      [[ -z "$(SLURM_CONF="$CONF" timeout 5 squeue -h -t running,completing -p "$PARTITION" 2>/dev/null || true)" ]] && break
      sleep 1
    done
  fi
  stop_pidfile slurmd "$DIR/slurmd.pid"
  stop_pidfile slurmctld "$DIR/slurmctld.pid"
  stop_pidfile munged "$DIR/munged.pid"
  say "stopped (files kept in $DIR)"
}

cmd_status() {
  local up=0
  for d in munged slurmctld slurmd; do
    if pid_alive "$DIR/$d.pid"; then echo "$d: running (pid $(cat "$DIR/$d.pid"))"; up=$((up + 1)); else echo "$d: not running"; fi
  done
  if ((up == 3)); then
    SLURM_CONF="$CONF" timeout 5 sinfo || true
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  return 1
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status   (folder: \${GMETA_SLURM_DIR:-/tmp/gmeta-slurm})" >&2; exit 2 ;;
esac
