"""A real one-node Slurm for tests (docs/cluster.md): Debian's slurm-wlm and munge, run as root.

    cluster = SlurmCluster()  # all under /tmp/splitmpi-slurm (or $SPLITMPI_SLURM_DIR)
    cluster.start()           # installs with apt-get if needed; stops leftovers first
    cluster.sbatch("--wait", "slurm/imagenet_split.sh", env=..., cwd=...)
    cluster.stop()            # cancels jobs, stops slurmctld, slurmd, munged (and leftovers)

What it sets up, all under one folder, so nothing in /etc or /run is touched:
- its own munge key and a ``munged`` run as the ``munge`` user on its own socket
  (``AuthInfo=socket=...`` points Slurm at it);
- ``slurm.conf`` (found by every Slurm command through ``SLURM_CONF``): ``SlurmUser=root``,
  ``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``,
  ``SelectType=select/cons_tres``, free TCP ports, pid/spool/state/log files under the folder,
  one node named ``hostname -s`` declaring ``CPUs=8`` (``SlurmdParameters=config_overrides``
  lets it claim more than the machine has) and ``Gres=gpu:4``;
- ``gres.conf`` with ``AutoDetect=off`` and four character devices made with ``mknod c 1 3``
  (the GPUs are fake: jobs must use ``train.device=cpu``).

Robust to being run again: a lock file keeps two test sessions from sharing the folder, and
whatever a previous (killed) session left behind is stopped by process id before the folder
is rebuilt: daemons found by their pid files or by the folder named in their command line,
job steps and job processes by the ``SLURM_CONF`` of this folder in their environment.
Job ids start at a new, time-based number each time (see ``first_job_id``).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel",
            "munged", "munge", "unmunge")
DAEMONS = ("slurmctld", "slurmd", "munged")
DEFAULT_DIR = Path(os.environ.get("SPLITMPI_SLURM_DIR", "/tmp/splitmpi-slurm"))


def which(name: str) -> str | None:
    # the daemons live in /usr/sbin, which a non-login PATH may lack
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def unavailable() -> str | None:
    """Why this machine cannot run the cluster (a reason to skip), or None."""
    if not hasattr(os, "geteuid") or not Path("/proc").is_dir():
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (the Slurm daemons run as root and munged as the munge user)"
    if all(which(b) for b in BINARIES):
        return None
    if not which("apt-get"):
        return ("Slurm is not installed and there is no apt-get to install it "
                f"({' '.join(PACKAGES)})")
    return None


def _run(cmd: list[str], timeout: float = 60, check: bool = True,
         env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit {proc.returncode}:\n"
                           f"{proc.stdout}\n{proc.stderr}")
    return proc


def install() -> None:
    """apt-get install slurm-wlm munge, unless their programs are already there."""
    if all(which(b) for b in BINARIES):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-q"], timeout=300, env=env)
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
         timeout=600, env=env)
    missing = [b for b in BINARIES if not which(b)]
    if missing:
        raise RuntimeError(f"apt-get installed {' '.join(PACKAGES)} but {missing} are missing")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    return _comm(pid) != "" and not Path(f"/proc/{pid}/stat").read_text().split(") ")[-1] \
        .startswith("Z")


def _end(pids: list[int], grace: float = 10) -> None:
    """SIGTERM, then SIGKILL what is still there after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        pids = [p for p in pids if _alive(p)]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            time.sleep(0.1)


def _ancestors() -> set[int]:
    """This process and its parents (never to be ended)."""
    pids, pid = set(), os.getpid()
    while pid > 0 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


class SlurmCluster:
    def __init__(self, base: Path = DEFAULT_DIR, cpus: int = 8, gpus: int = 4):
        self.base = Path(base)
        self.dir = self.base / "cluster"
        self.cpus, self.gpus = cpus, gpus
        self.node = socket.gethostname().split(".")[0]  # hostname -s
        self._lock = None
        self.started = False

    # --- paths ---------------------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.dir / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.dir / "munge" / "munge.socket"

    def env(self, extra: dict | None = None) -> dict:
        """The environment for Slurm commands (and jobs) of this cluster."""
        e = dict(os.environ)
        e["SLURM_CONF"] = str(self.conf)
        e["PATH"] = os.pathsep.join([e.get("PATH", ""), "/usr/sbin", "/usr/bin"])
        e.update(extra or {})
        return e

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for log in sorted((self.dir / "log").glob("*.log")) if self.dir.exists() else []:
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log} ---\n" + "\n".join(text))
        return "\n".join(out)

    # --- start ---------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> SlurmCluster:
        install()
        self._take_lock()
        try:
            self._stop_leftovers()
            self._write_files()
            self._start_munge()
            self._start_slurm(timeout)
        except BaseException:
            self.stop()
            raise
        self.started = True
        return self

    def _take_lock(self, wait: float = 600) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.base / "lock", "w")
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.base}/lock is held by another test session "
                                       f"for over {wait} s") from None
                time.sleep(1)

    def _our_processes(self) -> list[int]:
        """Processes started from this folder: daemons by pid file or by the folder on their
        command line (their pid file may be gone), and slurmstepd and job processes by the
        ``SLURM_CONF`` in their environment. Call only while holding the lock."""
        pids = set()
        for pidfile in self.base.rglob("*.pid"):
            try:
                pid = int(pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if _comm(pid) in DAEMONS:
                pids.add(pid)
        marker = f"SLURM_CONF={self.base}/".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if _comm(pid) in DAEMONS and str(self.base) in _cmdline(pid):
                pids.add(pid)
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in environ:
                pids.add(pid)
        return sorted(pids - _ancestors())

    def _stop_leftovers(self) -> None:
        _end(self._our_processes())
        if self.dir.exists():
            shutil.rmtree(self.dir)

    def _write_files(self) -> None:
        d = self.dir
        for sub in ("etc", "state", "spool", "log", "run", "dev", "munge"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        # GPUs: slurmd wants character devices (regular files are rejected); these are
        # /dev/null's numbers, nothing ever opens them as a GPU.
        for i in range(self.gpus):
            os.mknod(d / "dev" / f"nvidia{i}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        # Job ids must not repeat across restarts: MPICH names its shared-memory segment
        # after the PMI job name (<job id>.<step id> under srun), and a segment a killed
        # job left in /dev/shm would be reused by the next cluster's job 1, which then
        # hangs or fails in MPI_Init ("Message truncated"). Real clusters never reuse ids.
        self.first_job_id = 1000 + int(time.time()) % 60_000_000
        # MinJobAge=16: `sbatch --wait` polls after 2 s, then every 4x longer while that
        # stays below MinJobAge/2 (at most 32 s): 16 keeps it at 8 s, where the default
        # 300 made a 12 s job wait until its poll at 42 s. Finished jobs stay visible to
        # scontrol for 16 s, longer than a poll.
        self.ctld_port, self.slurmd_port = free_port(), free_port()
        while self.slurmd_port == self.ctld_port:
            self.slurmd_port = free_port()
        conf = f"""# written by tests/slurm_cluster.py
ClusterName=splitmpitest
FirstJobId={self.first_job_id}
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
InactiveLimit=0
KillWait=5
MinJobAge=16
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} Gres=gpu:{self.gpus} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        self.conf.write_text(conf)
        last = self.gpus - 1
        (d / "etc" / "gres.conf").write_text(
            "AutoDetect=off\n"
            f"NodeName={self.node} Name=gpu File={d}/dev/nvidia[0-{last}]\n")

    def _start_munge(self) -> None:
        m = self.dir / "munge"
        key = m / "munge.key"
        if which("mungekey"):
            _run([which("mungekey"), "--create", f"--keyfile={key}"])
        else:
            key.write_bytes(os.urandom(1024))
        shutil.chown(m, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        m.chmod(0o755)  # munged: the socket folder must be searchable by all
        key.chmod(0o600)
        _run(["runuser", "-u", "munge", "--", which("munged"), f"--socket={self.munge_socket}",
              f"--key-file={key}", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
              f"--seed-file={m}/munged.seed"])
        cred = _run([which("munge"), "-n", f"--socket={self.munge_socket}"]).stdout
        check = subprocess.run([which("unmunge"), f"--socket={self.munge_socket}"], input=cred,
                               capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"munge does not work: {check.stderr}")

    def _start_slurm(self, timeout: float) -> None:
        env = self.env()
        _run([which("slurmctld"), "-f", str(self.conf)], env=env)
        _run([which("slurmd"), "-f", str(self.conf), "-N", self.node], env=env)
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            proc = _run(["scontrol", "show", "node", self.node], check=False, env=env)
            state = proc.stdout + proc.stderr
            if "State=IDLE" in state and "DRAIN" not in state:
                return
            if "State=" in state and "IDLE" not in state and "ALLOC" not in state:
                # a node that came up DOWN/INVAL is put back into service (docs/cluster.md)
                _run(["scontrol", "update", f"nodename={self.node}", "state=resume"],
                     check=False, env=env)
            time.sleep(1)
        raise RuntimeError(f"node {self.node} not idle after {timeout} s:\n{state}\n"
                           + self.log_tail())

    # --- use -----------------------------------------------------------------------------
    def command(self, *args: str, timeout: float = 60, check: bool = True,
                **kw) -> subprocess.CompletedProcess:
        return _run(list(args), timeout=timeout, check=check, env=self.env(kw.get("env")))

    def sbatch(self, *args: str, env: dict | None = None, cwd: Path | str | None = None,
               timeout: float = 300, logs: list[Path] = ()) -> subprocess.CompletedProcess:
        """``sbatch ARGS`` with this cluster's SLURM_CONF (plus ``env``); use --wait to
        return when the job has ended (exit status = the job's). If it is still waiting
        after ``timeout`` s, the jobs are cancelled and the test fails showing the queue
        and the ``*.out`` files in the folders ``logs``."""
        try:
            return subprocess.run(["sbatch", *args], env=self.env(env), cwd=cwd,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            queue = self.queue()
            self.cancel_all()
            outs = [p for folder in logs for p in sorted(Path(folder).glob("*.out"))]
            shown = "\n".join(f"--- {p} ---\n{p.read_text(errors='replace')[-6000:]}"
                              for p in outs)
            raise AssertionError(f"sbatch {' '.join(args)} still waiting after {timeout} s:\n"
                                 f"{exc.stdout}\n{queue}\n{shown}") from None

    def queue(self) -> str:
        return self.command("squeue", "-a", check=False).stdout

    # --- stop ----------------------------------------------------------------------------
    def cancel_all(self, wait: float = 20) -> None:
        """scancel every job of this cluster and wait (up to ``wait`` s) until they are gone."""
        jobs = _run(["squeue", "-h", "-o", "%A"], check=False, timeout=20,
                    env=self.env()).stdout.split()
        if not jobs:
            return
        _run(["scancel", *jobs], check=False, timeout=20, env=self.env())
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _run(
                ["squeue", "-h"], check=False, timeout=20, env=self.env()).stdout.strip():
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel every job, stop the daemons (by pid) and release the lock. Never raises."""
        try:
            if self.conf.exists() and which("scancel"):
                self.cancel_all()
        except (OSError, subprocess.SubprocessError):
            pass
        finally:
            if self._lock is not None:
                _end(self._our_processes())
                self._lock.close()  # releases the flock
                self._lock = None
            self.started = False
