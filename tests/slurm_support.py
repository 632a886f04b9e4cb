"""A real one-node SLURM cluster for tests: munged, slurmctld and slurmd on this machine.

Everything lives in a private folder (``/tmp/medprep-slurm/<pid of the test process>/``):
a generated munge key and socket, ``slurm.conf`` on free ports, state, spool, logs and the
job completion record (``log/jobcomp.txt``). Clients (``sbatch``, ``squeue``, Snakemake's
SLURM executor) find the cluster through ``SLURM_CONF``; commands inside jobs through
``/run/slurm/conf``, linked to the folder while the cluster runs (see ``CONFIG_LINK``).
Nothing under ``/etc`` is used or changed.

No cgroups: processes are tracked by ``proctrack/linuxproc`` and memory is enforced by
``jobacct_gather/linux`` with ``OverMemoryKill`` (a job step whose RSS exceeds the job's
``--mem`` is killed), as on a cluster whose jobs are confined by memory limits.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RUN_ROOT = Path(tempfile.gettempdir()) / "medprep-slurm"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "scancel", "srun")
START_TIMEOUT_S = 30


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here; the message says why (tests skip with it)."""


@dataclass
class SlurmCluster:
    folder: Path
    conf: Path
    node: str
    cpus: int
    memory_mb: int

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def command(self, *args: str, timeout: float = 30) -> str:
        result = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **self.env},
            check=True,
        )
        return result.stdout

    def node_state(self) -> str:
        return self.command("sinfo", "--noheader", "--format=%T", "--nodes", self.node).strip()

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` of a job (kept for ``MinJobAge`` after it ends)."""
        return parse_record(self.command("scontrol", "--oneliner", "show", "job", job_id))


def parse_record(text: str) -> dict[str, str]:
    """``Key=Value Key=Value ...`` (SLURM's one-line records) as a dict."""
    record = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if sep:
            record[key] = value
    return record


##### availability #####


def unavailable_reason() -> str | None:
    """Why a private SLURM cluster cannot be started here, or None if it can."""
    if os.geteuid() != 0:
        return "SLURM test cluster needs root (slurmd runs jobs as their user)"
    missing = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None]
    if missing:
        return (
            f"SLURM/munge not installed (missing {', '.join(missing)}); "
            "`apt-get install slurm-wlm munge` (done by .ci/run as root)"
        )
    return None


##### start and stop #####


def start_cluster() -> SlurmCluster:
    """Start a one-node cluster; raise SlurmUnavailable (with the daemons' logs) if it fails."""
    reason = unavailable_reason()
    if reason:
        raise SlurmUnavailable(reason)
    stop_stale_clusters()
    blocker = config_link_blocker()
    if blocker:
        raise SlurmUnavailable(blocker)
    folder = RUN_ROOT / str(os.getpid())
    remove_cluster(folder)
    for sub in ("run", "state", "spool", "log"):
        (folder / sub).mkdir(parents=True)
    node = socket.gethostname().split(".")[0]
    hardware = node_hardware()
    cluster = SlurmCluster(
        folder=folder,
        conf=folder / "slurm.conf",
        node=node,
        cpus=int(hardware["CPUs"]),
        memory_mb=int(hardware["RealMemory"]),
    )
    write_munge_key(folder / "munge.key")
    cluster.conf.write_text(slurm_conf(folder, node, hardware, free_port(), free_port()))
    try:
        link_config(folder)
        start_daemons(cluster)
        wait_until_idle(cluster)
    except (SlurmUnavailable, subprocess.SubprocessError, OSError) as error:
        logs = daemon_logs(folder)
        stop_cluster(cluster)
        raise SlurmUnavailable(f"SLURM test cluster did not start: {error}\n{logs}") from error
    return cluster


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel the cluster's jobs, stop its daemons, remove its folder and config link."""
    # If the controller is already down there is nothing left to cancel through it.
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        cluster.command("scancel", "--full", "--user", "root", timeout=10)
    remove_cluster(cluster.folder)


def remove_cluster(folder: Path) -> None:
    stop_daemons(folder)
    unlink_config(folder)
    shutil.rmtree(folder, ignore_errors=True)


def stop_stale_clusters() -> None:
    """Stop clusters left by test processes that no longer exist (killed test runs)."""
    if RUN_ROOT.is_dir():
        for folder in RUN_ROOT.iterdir():
            if folder.name.isdigit() and not process_alive(int(folder.name)):
                remove_cluster(folder)
    dangling = CONFIG_LINK.is_symlink() and not CONFIG_LINK.exists()
    if dangling and Path(os.readlink(CONFIG_LINK)).parent == RUN_ROOT:
        CONFIG_LINK.unlink()


##### where jobs find slurm.conf #####

# Commands outside jobs find the cluster through SLURM_CONF. Inside a job, the SLURM
# plugin's job step removes every SLURM_* variable before it calls srun (and on clusters
# whose slurm.conf is not in /etc/slurm that fails: snakemake-executor-plugin-slurm #164),
# so srun falls back to /etc/slurm/slurm.conf and then to /run/slurm/conf/slurm.conf, the
# place where configless slurmd publishes its configuration. The test cluster links its
# folder there for as long as it runs.
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")
CONFIG_LINK = Path("/run/slurm/conf")


def config_link_blocker() -> str | None:
    """Why the test cluster cannot publish its slurm.conf for jobs, or None."""
    if DEFAULT_CONF.exists():
        return (
            f"this machine has its own SLURM configuration ({DEFAULT_CONF}); "
            "jobs of the test cluster would read it instead of the test cluster's"
        )
    if CONFIG_LINK.is_symlink() or CONFIG_LINK.exists():
        return (
            f"{CONFIG_LINK} is in use (by slurmd or another test session's cluster: "
            f"{os.path.realpath(CONFIG_LINK)})"
        )
    return None


def link_config(folder: Path) -> None:
    CONFIG_LINK.parent.mkdir(parents=True, exist_ok=True)
    CONFIG_LINK.symlink_to(folder)


def unlink_config(folder: Path) -> None:
    if CONFIG_LINK.is_symlink() and Path(os.path.realpath(CONFIG_LINK)) == folder.resolve():
        CONFIG_LINK.unlink()


##### daemons #####


def start_daemons(cluster: SlurmCluster) -> None:
    folder = cluster.folder
    run = folder / "run"
    env = {**os.environ, **cluster.env}
    subprocess.run(
        [
            "munged",
            "--force",
            f"--key-file={folder / 'munge.key'}",
            f"--socket={run / 'munge.sock'}",
            f"--pid-file={run / 'munged.pid'}",
            f"--seed-file={run / 'munged.seed'}",
            f"--log-file={folder / 'log' / 'munged.log'}",
        ],
        check=True,
        capture_output=True,
        timeout=20,
    )
    # Both fork into the background once their pid file is written.
    subprocess.run(["slurmctld"], env=env, check=True, capture_output=True, timeout=20)
    subprocess.run(
        ["slurmd", "-N", cluster.node], env=env, check=True, capture_output=True, timeout=20
    )


def wait_until_idle(cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    state = ""
    while time.monotonic() < deadline:
        try:
            state = cluster.node_state()
        except subprocess.CalledProcessError:
            state = "controller not answering"
        if state == "idle":
            return
        time.sleep(0.5)
    raise SlurmUnavailable(f"node {cluster.node} not idle after {START_TIMEOUT_S} s ({state})")


def stop_daemons(folder: Path) -> None:
    """Stop the daemons whose pid files are in ``folder/run`` (slurmd first, munged last)."""
    for daemon in ("slurmd", "slurmctld", "munged"):
        pid = read_pid(folder / "run" / f"{daemon}.pid")
        if pid is not None and process_name(pid) == daemon:
            terminate(pid)


def terminate(pid: int, timeout: float = 10) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


##### configuration #####


def node_hardware() -> dict[str, str]:
    """This machine as slurmd sees it (``slurmd -C``): CPUs, sockets, cores, RealMemory."""
    output = subprocess.run(
        ["slurmd", "-C"], capture_output=True, text=True, check=True, timeout=20
    ).stdout
    return parse_record(output.splitlines()[0])


def slurm_conf(
    folder: Path, node: str, hardware: dict[str, str], ctld_port: int, slurmd_port: int
) -> str:
    topology = " ".join(
        f"{key}={hardware[key]}"
        for key in (
            "CPUs",
            "Boards",
            "SocketsPerBoard",
            "CoresPerSocket",
            "ThreadsPerCore",
            "RealMemory",
        )
        if key in hardware
    )
    return f"""\
ClusterName=medprep-test
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder / "run" / "munge.sock"}
StateSaveLocation={folder / "state"}
SlurmdSpoolDir={folder / "spool"}
SlurmctldPidFile={folder / "run" / "slurmctld.pid"}
SlurmdPidFile={folder / "run" / "slurmd.pid"}
SlurmctldLogFile={folder / "log" / "slurmctld.log"}
SlurmdLogFile={folder / "log" / "slurmd.log"}
# No cgroups: track processes by parent pid, enforce --mem by polling RSS every second.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=1
JobAcctGatherParams=OverMemoryKill
# Cores and memory are both consumable: jobs are placed by --cpus-per-task and --mem.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# No accounting database (sacct does not work): finished jobs stay visible to squeue and
# scontrol for a day, and each one is also appended to the job completion file.
AccountingStorageType=accounting_storage/none
MinJobAge=86400
JobCompType=jobcomp/filetxt
JobCompLoc={folder / "log" / "jobcomp.txt"}
MpiDefault=none
ReturnToService=2
NodeName={node} NodeAddr=127.0.0.1 {topology} State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def write_munge_key(path: Path) -> None:
    path.write_bytes(os.urandom(1024))
    path.chmod(0o400)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def daemon_logs(folder: Path, lines: int = 15) -> str:
    parts = []
    for log in sorted((folder / "log").glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {log.name}\n" + "\n".join(tail))
    return "\n".join(parts)


##### processes #####


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def process_name(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


##### what Snakemake says about its jobs #####

_JOB_START = re.compile(r"^(?:local)?rule (?P<rule>\w+):\s*$")
_JOB_FIELD = re.compile(r"^\s+(?P<key>jobid|wildcards|threads|resources): (?P<value>.*)$")
_JOB_FINISHED = re.compile(r"^Finished jobid: (?P<jobid>\d+) ")
_JOB_SUBMITTED = re.compile(
    r"^Job (?P<jobid>\d+) has been submitted with SLURM jobid (?P<slurm>\d+) "
)


@dataclass
class JobEvent:
    """A job started (with what Snakemake printed about it), finished, or was submitted."""

    kind: str  # "start", "finish" or "submit"
    jobid: str
    rule: str = ""
    wildcards: dict[str, str] = field(default_factory=dict)
    threads: int = 1
    mem_mb: int | None = None
    disk_mb: int | None = None
    slurm_jobid: str | None = None


def job_events(log: str) -> list[JobEvent]:
    """The job starts, finishes and SLURM submissions of a Snakemake log, in order."""
    events: list[JobEvent] = []
    block: JobEvent | None = None
    for line in own_lines(log):
        if start := _JOB_START.match(line):
            block = JobEvent("start", "", rule=start["rule"])
            events.append(block)
        elif block is not None and (job_field := _JOB_FIELD.match(line)):
            _set_field(block, job_field["key"], job_field["value"])
        elif not line.startswith(" "):
            block = None  # the job's description ended
        if finished := _JOB_FINISHED.match(line):
            events.append(JobEvent("finish", finished["jobid"]))
        elif submitted := _JOB_SUBMITTED.match(line):
            events.append(JobEvent("submit", submitted["jobid"], slurm_jobid=submitted["slurm"]))
    return events


def own_lines(log: str) -> list[str]:
    """The lines of a Snakemake log without the logs of failed jobs it shows.

    With --show-failed-logs Snakemake prints each log of a failed job between two lines of
    "=" after "Logfile <path>:"; a SLURM job's log holds the job's own Snakemake output.
    """
    lines, shown = [], False
    previous = ""
    for line in log.splitlines():
        rule_line = line.startswith("=" * 40)
        if rule_line and (shown or previous.startswith("Logfile ")):
            shown = not shown
        elif not shown:
            lines.append(line)
        previous = line
    return lines


def _set_field(event: JobEvent, key: str, value: str) -> None:
    if key == "jobid":
        event.jobid = value.strip()
    elif key == "threads":
        event.threads = int(value)
    elif key == "wildcards":
        event.wildcards = dict(item.split("=", 1) for item in value.split(", ") if "=" in item)
    elif key == "resources":
        mem = re.search(r"\bmem_mb=(\d+)", value)
        event.mem_mb = int(mem.group(1)) if mem else None
        disk = re.search(r"\bdisk_mb=(\d+)", value)
        event.disk_mb = int(disk.group(1)) if disk else None
