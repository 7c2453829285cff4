"""Two simulated hosts on this one machine, for real multi-host MPI jobs in tests.

Each host is a Linux network namespace of its own (``ip netns``), joined to the other by a
veth pair whose two ends are both named ``mpi0``: 10.77.0.1/24 on ``HOSTS[0]``, 10.77.0.2/24
on ``HOSTS[1]``, and nothing else (no route out: no traffic can leave the pair). Every process
of a host runs through ``enter``: ``ip netns exec NS unshare --uts --mount --ipc``, which
gives it the host's own host name, its own ``/etc/hosts`` (bind-mounted: both names and
addresses), its own ``/dev/shm`` (a fresh tmpfs) and System V IPC, and optionally a CPU set
(``taskset``), so ranks on different hosts share neither a name nor shared memory.

MPICH's Hydra runs on the first host (``mpiexec -f HOSTFILE``) and starts its proxy on
the second through ``-launcher ssh -launcher-exec RSH``: Hydra calls ``RSH -x HOST "proxy
command"`` as it would call ssh, and RSH runs the command with ``enter`` on that host. The
proxy connects back to ``mpiexec`` over the veth by host name, and MPICH puts the ranks of
one proxy on one node (``MPI_COMM_TYPE_SHARED``); between the hosts its UCX netmod talks
TCP over ``mpi0``. Needs root.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mpirun

HOSTS = ("splitmpi-a", "splitmpi-b")
ADDRESSES = ("10.77.0.1", "10.77.0.2")
NIC = "mpi0"

ENTER = """#!/bin/sh
# enter NS HOSTNAME CPUS COMMAND...: run COMMAND on the simulated host (CPUS "" = all)
ns=$1 name=$2 cpus=$3; shift 3
exec ip netns exec "$ns" unshare --uts --mount --ipc -- sh -c '
mount --bind "{hosts}" /etc/hosts && mount -t tmpfs -o size=256m tmpfs /dev/shm &&
hostname "$0" && if [ -n "$1" ]; then cpus=$1; shift; exec taskset -c "$cpus" "$@"; fi;
shift; exec "$@"' "$name" "$cpus" "$@"
"""

RSH = """#!/bin/sh
# what Hydra calls instead of ssh: rsh [-x] HOST "COMMAND": COMMAND on HOST, in a shell
[ "$1" = "-x" ] && shift
host=$1; shift
case $host in
{cases}  *) echo "rsh: no simulated host $host" >&2; exit 255;;
esac
"""


def unavailable() -> str | None:
    """Why two hosts cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "two simulated hosts need root (ip netns, unshare, mount)"
    for tool in ("ip", "unshare", "taskset"):
        if not shutil.which(tool):
            return f"no {tool} on PATH"
    name = f"smpi{os.getpid()}t"
    try:
        for cmd in (["ip", "netns", "add", name],
                    ["ip", "netns", "exec", name, "unshare", "--uts", "--mount", "--ipc",
                     "true"]):
            probe = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            if probe.returncode != 0:
                return f"ip netns is unavailable ({' '.join(cmd)}: {probe.stderr.strip()})"
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    return None


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


class TwoHosts:
    """``up()`` makes the namespaces and files under ``folder``; ``down()`` removes them
    and ends every process still inside them (safe to call after a partial ``up``)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        tag = str(os.getpid())  # several test sessions may run side by side
        self.ns = {h: f"smpi{tag}{h[-1]}" for h in HOSTS}
        self.veth = [f"smpi{tag}v{i}" for i in range(2)]  # names in the root ns, briefly
        self.hostfile = self.folder / "hostfile"
        self.enter = self.folder / "enter"
        self.rsh = self.folder / "rsh"

    def up(self) -> TwoHosts:
        self.folder.mkdir(parents=True, exist_ok=True)
        hosts = self.folder / "hosts"
        hosts.write_text("127.0.0.1 localhost\n"
                         + "".join(f"{a} {h}\n" for a, h in zip(ADDRESSES, HOSTS)))
        self.hostfile.write_text("".join(f"{h}:2\n" for h in HOSTS))
        self.enter.write_text(ENTER.format(hosts=hosts))
        # the CPU set of a host that Hydra starts: CPUS_<index>, passed on through mpiexec
        cases = "".join(f'  {h}) exec "{self.enter}" {self.ns[h]} {h} "$CPUS_{i}" '
                        f'sh -c "$*";;\n' for i, h in enumerate(HOSTS))
        self.rsh.write_text(RSH.format(cases=cases))
        for f in (self.enter, self.rsh):
            f.chmod(0o755)
        for h in HOSTS:
            _ip("netns", "add", self.ns[h])
        _ip("link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        for v, h, address in zip(self.veth, HOSTS, ADDRESSES):
            ns = self.ns[h]
            _ip("link", "set", v, "netns", ns)
            _ip("-n", ns, "link", "set", v, "name", NIC)
            # no IPv6 (router solicitations and the like): only the ranks' traffic on mpi0
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                            f"net.ipv6.conf.{NIC}.disable_ipv6=1"], capture_output=True)
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", NIC)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", NIC, "up")
        return self

    def pids(self) -> list[int]:
        """Processes still running inside the hosts' namespaces (ours alone)."""
        found = []
        for ns in self.ns.values():
            proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            found += [int(p) for p in proc.stdout.split()]
        return found

    def host_of(self, pid: int) -> str | None:
        """The simulated host whose network namespace process ``pid`` runs in."""
        proc = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True,
                              text=True)
        names = proc.stdout.split()
        return next((h for h, ns in self.ns.items() if ns in names), None)

    def kill_all(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def down(self) -> None:
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:  # a dying proxy may still fork
            self.kill_all()
            time.sleep(0.05)
        for ns in self.ns.values():  # deleting a namespace deletes its veth end, and the pair
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        for v in self.veth:  # only there if up() stopped before moving it
            subprocess.run(["ip", "link", "delete", v], capture_output=True)

    def counters(self, host: str) -> dict[str, int]:
        """Bytes and packets through the host's ``mpi0`` so far."""
        out = subprocess.run(["ip", "-n", self.ns[host], "-j", "-s", "link", "show", NIC],
                             capture_output=True, text=True, check=True, timeout=30).stdout
        stats = json.loads(out)[0]["stats64"]
        return {f"{way}_{what}": stats[way][what] for way in ("rx", "tx")
                for what in ("bytes", "packets")}

    def command(self, n: int, *args: str, module: str = "splitmpi",
                cpus: tuple[str, str] = ("", ""), launch: tuple = ()) -> tuple[list[str], dict]:
        """``mpiexec`` started on the first host, half the ranks on each host; ``cpus``:
        each host's CPU list for taskset (``""``: all); ``launch``: more mpiexec options."""
        cmd = [str(self.enter), self.ns[HOSTS[0]], HOSTS[0], cpus[0],
               mpirun.mpiexec(), "-f", str(self.hostfile),
               "-launcher", "ssh", "-launcher-exec", str(self.rsh), *launch,
               "-n", str(n), sys.executable, "-m", module, *args]
        env = mpirun.env()
        env.update({f"CPUS_{i}": c for i, c in enumerate(cpus)})
        return cmd, env

    def popen(self, n: int, *args: str, cwd: Path | None = None, **kw) -> subprocess.Popen:
        cmd, env = self.command(n, *args, **kw)
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def run(self, n: int, *args: str, cwd: Path | None = None, timeout: float = 120,
            **kw) -> subprocess.CompletedProcess:
        """Run the job; one still running at ``timeout`` is killed (every process in the
        hosts) and the test fails."""
        proc = self.popen(n, *args, cwd=cwd, **kw)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            out, err = proc.communicate()
            raise AssertionError(f"two-host job {args} hung for {timeout} s:\n{out}\n{err}")\
                from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def ok(self, n: int, *args: str, **kw) -> subprocess.CompletedProcess:
        proc = self.run(n, *args, **kw)
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc


class Lines:
    """A job's stdout read line by line in a thread, so a test can wait for one line
    with a deadline while the job runs on."""

    def __init__(self, stream):
        self.queue: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.queue.put(line)
        self.queue.put(None)

    def _next(self, deadline: float) -> str | None:
        """The next line (kept in ``seen``), or None at the end or at the deadline."""
        try:
            line = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None
        if line is not None:
            self.seen.append(line)
        return line

    def wait(self, prefix: str, deadline: float) -> str:
        """The next line starting with ``prefix``, by ``time.monotonic()`` ``deadline``."""
        while True:
            line = self._next(deadline)
            if line is None:
                raise AssertionError(f"no {prefix!r} line from the job; it wrote:\n"
                                     + "".join(self.seen))
            if line.startswith(prefix):
                return line

    def rest(self, deadline: float) -> str:
        """Everything up to the end of the stream (or to the deadline)."""
        while self._next(deadline) is not None:
            pass
        return "".join(self.seen)
