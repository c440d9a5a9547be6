"""Beyond one machine, for real (tests/cluster.py): two network-namespace machines on this one, each with an
address of its own, so that the rendezvous and the gradients cross an interface (loopback is private to
each namespace); and a real Slurm (slurmctld here, a slurmd per namespace) running launch/slurm.sbatch.
- slurm: `sbatch --nodes 2 launch/slurm.sbatch`, preempted with SIGUSR1 mid-epoch, saves, exits 75, requeues
  itself and the requeued job resumes to the weights of a two-process run on one host;
- node, dead: launch/node.sh on each machine forms one two-process run; one machine's processes SIGKILLed
  mid-epoch, the survivor exits within the timeout with one line, and a resume ends with the same weights;
- address: a wrong main address or a closed port is reported in seconds, naming what was tried."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from cluster import IFNAME, Nodes, Slurm, install_slurm, why_not
from conftest import BIN, ROOT, read_jsonl
from launching import REFERENCE, Background, command, kill_tree, load_resume_weights, reference_run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
PORT = "29511"  # inside node 0's own namespace: nothing else listens there


@pytest.fixture(scope="module")
def nodes():
    reason = why_not()
    if reason:
        pytest.skip(reason)
    made = Nodes()
    yield made
    made.delete()


@pytest.fixture(scope="module")
def slurm(nodes, tmp_path_factory):
    reason = install_slurm()
    if reason:
        pytest.skip(reason)
    # not under pytest's temporary directory: munged, running as the munge user, must reach its files
    root = Path(tempfile.mkdtemp(prefix="toolkit-slurm-"))
    cluster = Slurm(nodes, root)
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


def _env(nodes, **extra) -> dict:
    return {"ACCELERATE": str(BIN / "accelerate"), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": IFNAME, "MAIN_ADDR": nodes.addrs[0], "MAIN_PORT": PORT,
            "NUM_NODES": "2", "PROCS_PER_NODE": "1", "CONNECT_TIMEOUT_S": "30", **extra}


def _node(nodes, node: int, out, name, overrides, logs, *args, **env) -> Background:
    """launch/node.sh in the namespace of `node`, as a user runs it on each machine."""
    cmd = [*nodes.prefix(node), "bash", str(ROOT / "launch" / "node.sh"), *args, *command(out, name, overrides)[1:]]
    return Background(cmd, logs / f"node{node}", env=_env(nodes, NODE_RANK=str(node), **env))


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def _bytes(nodes, node: int) -> int:
    """Bytes the node has sent over its interface (its namespace's statistics)."""
    shown = subprocess.run(["ip", "-j", "-s", "-n", nodes.names[node], "link", "show", IFNAME], capture_output=True,
                           text=True, check=True).stdout
    return json.loads(shown)[0]["stats64"]["tx"]["bytes"]


def test_address_wrong_main_address_or_closed_port_is_reported_in_seconds(nodes, tmp_path):
    wrong = f"10.213.{nodes.subnet}.99"  # in this test's own subnet, held by nobody
    for addr, port in ((wrong, PORT), (nodes.addrs[0], "29599")):  # nothing listens on node 0's 29599
        t0 = time.monotonic()
        launch = _node(nodes, 1, tmp_path, "run", [], tmp_path / "logs" / addr, MAIN_ADDR=addr, MAIN_PORT=port,
                       CONNECT_TIMEOUT_S="4")
        assert launch.wait(60) == 2
        took = time.monotonic() - t0
        assert launch.stderr().rstrip().splitlines()[-1] == (
            f"error: node 1 cannot reach the main node at {addr}:{port} (tried for 4 s): check "
            "--main_process_ip/MAIN_ADDR, MAIN_PORT and that node 0 has started and its port is open")
        assert 3 <= took < 12, took  # the check counts whole seconds
        print(f"{addr}:{port} reported after {took:.1f} s")
    # node 0 told a main address that is not its own (node 1's): said at once, before torchrun's rendezvous
    t0 = time.monotonic()
    launch = _node(nodes, 0, tmp_path, "run", [], tmp_path / "logs" / "node0", MAIN_ADDR=nodes.addrs[1])
    assert launch.wait(60) == 2
    took = time.monotonic() - t0
    assert launch.stderr().rstrip().splitlines()[-1] == (
        f"error: node 0 is the main node but cannot listen at {nodes.addrs[1]}:{PORT} (Cannot assign requested "
        "address): MAIN_ADDR/--main_process_ip must be an address of this machine, MAIN_PORT a free port")
    assert took < 5, took
    print(f"node 0 given {nodes.addrs[1]}: reported after {took:.1f} s")


def test_slurm_two_node_job_preempted_requeues_and_resumes_to_the_reference_weights(slurm, nodes, tmp_path_factory,
                                                                                   tmp_path):
    reference_dir, _ = reference_run(tmp_path_factory)
    log = tmp_path / "job.out"
    args = command(tmp_path, "run", [*REFERENCE, "train.log_every=2"])[1:]  # agreed points every 2 steps
    env = {**slurm.env, **_env(nodes), "SRUN": slurm.bin["srun"], "SCONTROL": slurm.bin["scontrol"],
           "PATH": f"{BIN}:/usr/bin:/bin:/usr/sbin:/sbin", "GPUS_PER_NODE": "1"}
    for key in ("MAIN_ADDR", "MAIN_PORT", "NUM_NODES", "PROCS_PER_NODE"):  # slurm.sbatch derives these itself
        env.pop(key)
    t0 = time.monotonic()
    submitted = subprocess.run([slurm.bin["sbatch"], "--parsable", "--nodes", "2", "--ntasks-per-node", "1",
                                "--cpus-per-task", "1", "--gpus-per-node", "0", "--output", str(log),
                                "--open-mode", "append", str(ROOT / "launch" / "slurm.sbatch"), *args],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 240
    while "epoch 2/3 step 2/8" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline and slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), slurm.logs()
        time.sleep(0.05)
    signalled = subprocess.run([slurm.bin["scancel"], "--signal=USR1", job], env=env, capture_output=True, text=True)
    assert signalled.returncode == 0, signalled.stderr
    pending = slurm.wait_job(job, states=("PENDING",), restarts=1, timeout=120)
    # Slurm holds a requeued job back for a while (EligibleTime, about 2 minutes here): once the nodes are
    # clean (the first run's processes gone), let it go
    eligible = pending["EligibleTime"]
    slurm.wait_idle()
    slurm.scontrol("update", f"JobId={job}", "StartTime=now")
    done = slurm.wait_job(job, restarts=1, timeout=300)
    took = time.monotonic() - t0
    text = log.read_text()
    assert done["JobState"] == "COMPLETED" and done["Restarts"] == "1" and done["ExitCode"] == "0:0", (
        {k: done.get(k) for k in ("JobState", "Reason", "ExitCode", "Restarts")}, text[-3000:], slurm.logs())
    run_dir = tmp_path / "run"
    saved = re.search(rf"stopped: preempted \(SIGUSR1\): checkpoints/last of {run_dir} saved at epoch 2, batch (\d+) "
                      r"in ([\d.]+) s; continue with --resume \(exit status 75\)", text)
    assert saved and int(saved.group(1)) in (4, 6), text[-3000:]
    assert f"requeueing job {job}: it resumes from checkpoints/last" in text
    assert f"resumed {run_dir} after epoch 1, batch {saved.group(1)} of 8 of epoch 2" in text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["num_processes"] == 2 and summary["val_samples"] == 171
    assert [m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]
    _equal(load_resume_weights(run_dir), load_resume_weights(reference_dir))
    print(f"slurm job {job}: preempted at batch {saved.group(1)}, save {saved.group(2)} s, requeued (eligible at "
          f"{eligible}, released at once), done in {took:.1f} s")


def test_node_two_machines_one_run_a_dead_node_stops_the_survivor_in_time_and_a_resume_ends_as_one_host(
        nodes, tmp_path_factory, tmp_path):
    """launch/node.sh on each machine forms one run of two processes; one machine's processes are SIGKILLed
    mid-epoch; the survivor stops within train.collective_timeout_s with one line; both machines resume it,
    and it ends with the weights of a two-process run on one host (launch/cpu.sh, the session's reference)."""
    reference_dir, _ = reference_run(tmp_path_factory)
    sent = _bytes(nodes, 1)
    overrides = [*REFERENCE, "train.collective_timeout_s=15", "train.checkpoint_every=2"]
    launches = [_node(nodes, i, tmp_path, "run", overrides, tmp_path / "logs") for i in (0, 1)]
    launches[0].wait_for(lambda: "epoch 2/3 step 5/8" in launches[0].stdout(), timeout=240)
    kill_tree(launches[1].proc)  # node 1's processes (SIGKILL, from its launcher down), while node 0 is frozen
    t0 = time.monotonic()
    launches[0].signal(0)  # wake node 0 (signal 0: nothing sent but the SIGCONT)
    status = launches[0].wait(60)
    took = time.monotonic() - t0
    ours = [line for line in launches[0].stderr().splitlines() if line.startswith("error: ")]
    assert status == 2 and len(ours) == 1, launches[0].stderr()[-3000:]
    assert ours[0].startswith("error: lost contact with another process of the run (a node died, or did not "
                              "answer within train.collective_timeout_s = 15 s)")
    assert ours[0].endswith("checkpoints/last holds epoch 1 and batch 4 of epoch 2; start the run again with --resume")
    assert took < 15 + 15, took
    assert launches[0].stdout().count("2 processes on 2 machines (DDP over gloo)") == 1 and "Epoch [" not in launches[1].stdout()

    resumed = [_node(nodes, i, tmp_path, "run", [*overrides, "train.resume=true"], tmp_path / "logs2") for i in (0, 1)]
    assert [launch.wait(300) for launch in resumed] == [0, 0], resumed[0].stderr()[-3000:]
    assert f"resumed {tmp_path / 'run'} after epoch 1, batch 4 of 8 of epoch 2" in resumed[0].stdout()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["val_samples"] == 171 and summary["status"] == "complete"
    weights = load_resume_weights(tmp_path / "run")
    _equal(weights, load_resume_weights(reference_dir))
    # the gradients went over node 1's interface (loopback is private to each namespace): 2.5 epochs x 8 steps
    crossed = _bytes(nodes, 1) - sent
    assert crossed > 20 * 4 * sum(t.numel() for t in weights.values()) / 2, crossed
    print(f"dead node: the survivor exited {took:.1f} s after the kill: {ours[0]}; {crossed / 1e6:.1f} MB sent by node 1")
