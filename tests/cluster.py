"""Two machines on this one, for the distributed tests: two network namespaces ("nodes") joined to the
host by a bridge, each with an address of its own, and a real Slurm cluster on them (Debian's slurm-wlm
and munge): munged and slurmctld on the host, one slurmd in each namespace, from a generated slurm.conf
with its own ports, spool, state and pid files. Everything is stopped by process id (pid files, and the
pids inside each namespace) and the namespaces and the bridge are deleted. Traffic goes only to the
addresses made here (10.213.N.0/24) and to loopback."""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import suppress
from pathlib import Path

from toolkit.ports import free_port_block

PACKAGES = ("slurm-wlm", "munge", "iproute2")
# Each node's interface has this name inside its namespace, so that one GLOO_SOCKET_IFNAME fits every node
# (the host name resolves to 127.0.0.1 here, and gloo would otherwise pick loopback, private to each node).
IFNAME = "tketh0"
SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "munged")


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def why_not() -> str | None:
    """Why the namespaces cannot be made here (the exact reason a test skips with), or None."""
    if os.geteuid() != 0:
        return "needs root: network namespaces (ip netns) and slurmd need CAP_NET_ADMIN and CAP_SYS_ADMIN"
    if not shutil.which("ip"):
        return "iproute2 (`ip`) is not installed"
    probe = f"tkprobe{os.getpid()}"
    result = sh("ip", "netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"`ip netns add` fails on this machine: {result.stderr.strip()}"
    sh("ip", "netns", "del", probe, check=False)
    return None


def install_slurm() -> str | None:
    """apt-get install slurm-wlm munge iproute2 where they are missing (idempotent, as .ci/run does);
    the reason it cannot, or None."""
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in SLURM_BINARIES):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm-wlm and munge are not installed and cannot be (needs root and apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if result.returncode != 0:
            return f"{' '.join(cmd)} failed: {result.stderr.strip()[-300:]}"
    return None


class Nodes:
    """Namespaces tk<pid>n0, tk<pid>n1 at 10.213.N.2 and .3, the host's bridge at 10.213.N.1."""

    def __init__(self, count: int = 2):
        tag = os.getpid() % 100_000
        self.subnet = 20 + os.getpid() % 200
        self.bridge, self.host_addr = f"tkb{tag}", f"10.213.{self.subnet}.1"
        self.names = [f"tk{tag}n{i}" for i in range(count)]
        self.addrs = [f"10.213.{self.subnet}.{i + 2}" for i in range(count)]
        self._made: list[tuple[str, str]] = []
        try:
            self._up()
        except Exception:
            self.delete()
            raise

    def _up(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        sh("ip", "addr", "add", f"{self.host_addr}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for i, (ns, addr) in enumerate(zip(self.names, self.addrs)):
            host_end, ns_end = f"{self.bridge}h{i}", f"{self.bridge}p{i}"
            sh("ip", "netns", "add", ns)
            self._made.append(("netns", ns))
            sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            self._made.append(("link", host_end))
            sh("ip", "link", "set", host_end, "master", self.bridge, "up")
            sh("ip", "link", "set", ns_end, "netns", ns)
            sh("ip", "-n", ns, "link", "set", ns_end, "name", IFNAME)
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", IFNAME)
            sh("ip", "-n", ns, "link", "set", IFNAME, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def prefix(self, node: int) -> list[str]:
        """Run a command on a node: in its network namespace only (`ip netns exec` would also remount /sys,
        hiding the cgroup filesystem slurmd looks for)."""
        return ["nsenter", f"--net=/run/netns/{self.names[node]}"]

    def run(self, node: int, *cmd: str) -> subprocess.CompletedProcess:
        return sh(*self.prefix(node), *cmd)

    def pids(self, node: int) -> list[int]:
        result = sh("ip", "netns", "pids", self.names[node], check=False)
        return [int(p) for p in result.stdout.split()]

    def kill_node(self, node: int) -> None:
        """SIGKILL every process living in the node's namespace (a dead machine)."""
        for pid in self.pids(node):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def delete(self) -> None:
        for node in range(len(self.names)):
            with suppress(Exception):
                self.kill_node(node)
        for kind, name in reversed(self._made):
            if kind == "netns":
                sh("ip", "netns", "del", name, check=False)
            else:
                sh("ip", "link", "del", name, check=False)
        self._made = []


def _free_port(host: str) -> int:
    return free_port_block(1, host)


def _stop(pid_file: Path, timeout: float = 10) -> None:
    """Stop the daemon whose pid the file holds: SIGTERM, then SIGKILL."""
    if not pid_file.is_file():
        return
    with suppress(ValueError):
        pid = int(pid_file.read_text().split()[0])
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)


SLURM_CONF = """\
ClusterName=tk
SlurmctldHost={host}({host_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also holds a requeued job back (120 s by default), and the main scheduling loop runs every
# sched_interval (60 s): a preempted task of the tests starts again within about half a minute
AuthInfo=socket={munge_socket},cred_expire=30
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
JobRequeue=1
KillWait=5
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
{nodes}
PartitionName=tk Nodes={node_names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
"""


class Slurm:
    """munged + slurmctld on the host, a slurmd per node of `nodes`, all of this test session."""

    def __init__(self, nodes: Nodes, root: Path):
        # one cluster at a time on this machine (the suite's two workers may each want one): its munged,
        # slurmctld and node names are machine-wide enough not to be shared
        self._lock = open(Path(tempfile.gettempdir()) / "toolkit-slurm.lock", "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.nodes, self.dir = nodes, root
        for sub in ("state", "spool", "munge"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 1
        self.node_names = [f"node{i}" for i in range(len(nodes.names))]
        for name in self.node_names:
            (root / "spool" / name).mkdir(exist_ok=True)
        self.conf = root / "slurm.conf"
        self.conf.write_text(SLURM_CONF.format(
            host=socket.gethostname(), host_addr=nodes.host_addr, ctld_port=_free_port(nodes.host_addr),
            slurmd_port=_free_port("127.0.0.1"), munge_socket=root / "munge" / "munge.socket", dir=root,
            node_names=",".join(self.node_names),
            nodes="\n".join(f"NodeName={n} NodeAddr={a} CPUs={cpus} State=UNKNOWN"
                            for n, a in zip(self.node_names, nodes.addrs))))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.bin = {name: shutil.which(name) or f"/usr/sbin/{name}" for name in SLURM_BINARIES}
        try:
            self._start()
        except Exception:
            self.stop()
            raise

    def _start(self) -> None:
        munge = self.dir / "munge"
        user = pwd.getpwnam("munge")
        os.chown(munge, user.pw_uid, user.pw_gid)
        self.dir.chmod(0o755)  # munged runs as munge: it must reach its directory
        self._daemon(["runuser", "-u", "munge", "--", self.bin["munged"], f"--socket={munge / 'munge.socket'}",
                        f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                        f"--seed-file={munge / 'munged.seed'}", "--key-file=/etc/munge/munge.key"],
)
        self._daemon([self.bin["slurmctld"], "-f", str(self.conf)])
        for i, name in enumerate(self.node_names):
            self._daemon([*self.nodes.prefix(i), self.bin["slurmd"], "-f", str(self.conf), "-N", name])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = self.scontrol("show", "nodes", "-o", check=False).stdout
            if states.count("State=IDLE") == len(self.node_names):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the slurmd nodes did not become IDLE: {states}\n{self.logs()}")

    def _daemon(self, cmd: list[str]) -> None:
        """Start a daemon that forks into the background and writes its pid file."""
        result = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=30)
        if result.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: exit {result.returncode}: {result.stderr.strip()}\n{self.logs()}")

    def wait_idle(self, timeout: float = 60) -> None:
        """Until every node is IDLE: a job's processes are gone and the nodes cleaned up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.scontrol("show", "nodes", "-o").stdout
            if states.count("State=IDLE ") + states.count("State=IDLE+") >= len(self.node_names) and "COMPLETING" not in states:
                return
            time.sleep(0.2)
        raise AssertionError(f"nodes not idle after {timeout} s: {states}")

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([self.bin["scontrol"], *args], capture_output=True, text=True, env=self.env,
                                timeout=30)
        if check and result.returncode:
            raise RuntimeError(f"scontrol {' '.join(args)}: {result.stderr}")
        return result

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict of its Key=Value fields."""
        out = self.scontrol("show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_job(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
                 timeout: float = 300, restarts: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job.get("JobState") in states and int(job.get("Restarts", 0)) >= restarts:
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout} s\n{self.logs()}")

    def logs(self) -> str:
        logs = sorted([*self.dir.glob("*.log"), *self.dir.glob("munge/*.log")])
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in logs)

    def stop(self) -> None:
        for name in getattr(self, "node_names", []):
            _stop(self.dir / f"slurmd.{name}.pid")
        _stop(self.dir / "slurmctld.pid")
        _stop(self.dir / "munge" / "munged.pid")
        self._lock.close()  # the next cluster may start
