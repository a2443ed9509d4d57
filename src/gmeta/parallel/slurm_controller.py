"""Before a SLURM multirun submits anything: a controller must answer, and job states must be readable.

Without one, ``sbatch`` (called by the submitit launcher) retries for a while and then fails with
"Unable to contact slurm controller", or there is no ``sbatch`` at all and submitit fails with a
message about ``srun``; neither says what to do. ``RequireSlurmController`` is a Hydra callback
(``hydra.callbacks`` in ``conf/cluster/slurm*.yaml``): at the start of the multirun it runs
``scontrol ping`` (bounded by ``timeout_s``) and stops the run with a message that says how to get a
controller (``hint``) and exit status 2 (a user error, as ``gmeta.errors``), before any submission.

submitit follows its jobs with ``sacct``, which needs SLURM's accounting database. A cluster
without one (``AccountingStorageType=accounting_storage/none``, as the local one-node cluster of
``scripts/slurm/local_cluster.sh``) answers every ``sacct`` with an error; submitit then sees every
job as UNKNOWN and waits for its result file forever: a job cancelled or killed at its time limit
writes none, so the multirun would hang. On such a cluster the callback makes submitit ask
``squeue`` instead (the controller keeps finished jobs for ``MinJobAge`` seconds).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from submitit.slurm import slurm as submitit_slurm

from gmeta.errors import USER_ERROR_EXIT

log = logging.getLogger(__name__)


def controller_problem(timeout_s: float = 15.0) -> str | None:
    """Why no SLURM controller can take jobs from this machine, or None when ``scontrol ping`` says UP."""
    missing = [c for c in ("sbatch", "scontrol", "srun") if shutil.which(c) is None]
    if missing:
        return f"the SLURM client commands {', '.join(missing)} are not on PATH"
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.isfile(conf):  # scontrol would retry reading it for 60 s
        return f"SLURM_CONF={conf} does not exist"
    where = f"SLURM_CONF={conf}" if conf else "no SLURM_CONF: the default slurm.conf or a configless setup"
    try:
        proc = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"`scontrol ping` did not answer within {timeout_s:.0f} s ({where})"
    answer = ((proc.stdout + proc.stderr).strip().splitlines() or [""])[0]  # its first line says it
    # "Slurmctld(primary) at host is UP"; a backup controller may be DOWN while the primary is UP
    if proc.returncode == 0 and " is UP" in answer:
        return None
    return f"no SLURM controller answers ({where}): `scontrol ping` said: {answer or 'nothing'}"


def accounting_enabled(timeout_s: float = 15.0) -> bool:
    """Whether the cluster keeps job accounting (what ``sacct`` reads); True when it cannot tell."""
    try:
        proc = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return True
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "AccountingStorageType":
            return value.strip() not in ("", "accounting_storage/none")
    return True


class SqueueInfoWatcher(submitit_slurm.SlurmInfoWatcher):
    """submitit's job-state watcher reading ``squeue`` (no accounting needed) instead of ``sacct``."""

    def _make_command(self) -> list[str] | None:
        to_check = sorted({x.split("_")[0] for x in self._registered - self._finished})
        if not to_check:
            return None
        # --array: one line per array element; --states=all: finished jobs too (for MinJobAge)
        return ["squeue", "--noheader", "--array", "--states=all", "-o", "%i|%T|%N", "-j", ",".join(to_check)]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        text = string.decode() if isinstance(string, bytes) else string
        return super().read_info("JobID|State|NodeList\n" + text)  # sacct's header, then squeue's lines


class RequireSlurmController(Callback):
    """Hydra callback: fail the multirun at its start, with ``hint``, when no controller answers.

    Args:
        hint: how to get a controller (the local cluster script for ``cluster=slurm_cpu``).
        timeout_s: the longest ``scontrol ping`` may take.
    """

    def __init__(self, hint: str = "", timeout_s: float = 15.0) -> None:
        self.hint = hint
        self.timeout_s = timeout_s

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        problem = controller_problem(self.timeout_s)
        if problem:
            # Hydra turns an exception raised in a callback into a warning and goes on submitting:
            # stop here with the message and the entry points' user-error status (gmeta.errors)
            prog = os.path.basename(sys.argv[0]) or "train.py"
            print(
                f"{prog}: error: cannot submit to SLURM: {problem}. {self.hint}".strip(),
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(USER_ERROR_EXIT)
        if not accounting_enabled(self.timeout_s):
            log.info("SLURM keeps no accounting (no sacct): following the jobs with squeue")
            submitit_slurm.SlurmJob.watcher = SqueueInfoWatcher(delay_s=30)
