"""A real single-node Slurm (slurmctld + slurmd + munge) for the batch-script tests.

Needs root; installs the Debian packages when they are missing. Every file lives in a
temporary folder (SLURM_CONF points there), the daemons use free ports on loopback, and
they are stopped by their pid files afterwards.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ..distributed.conftest import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def ensure_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and apt-get is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
    out = subprocess.run(
        ["apt-get", "install", "-y", "-q", *PACKAGES], env=env, capture_output=True, text=True, timeout=900
    )
    if out.returncode != 0:
        pytest.skip(f"could not install Slurm: {out.stderr[-500:]}")


def ensure_munge() -> None:
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return
    key = Path("/etc/munge/munge.key")
    if not key.is_file():
        subprocess.run(["mungekey", "--create", "--force"], check=True, capture_output=True)
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        os.makedirs(d, exist_ok=True)
    subprocess.run(["munged", "--force"], check=True, capture_output=True, timeout=60)


def write_conf(root: Path) -> Path:
    """slurm.conf for one node on loopback.

    `cred_expire` is also how long a requeued job waits before it may start again (120 s by
    default); 30 s keeps the preemption test short without forcing the start, which would race
    slurmd's clean-up of the job's first run. `KillWait` (30 s by default) is how long a cancelled
    job may take between SIGTERM and SIGKILL: the training script traps TERM to stop its Ray job,
    which needs a few seconds, not 30.
    """
    host = socket.gethostname()
    cpus = os.cpu_count() or 2
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=dopsd-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=30
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobRequeue=1
KillWait=5
ReturnToService=2
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    (root / "state").mkdir()
    (root / "spool").mkdir()
    return conf


def start_slurm(root: Path) -> dict:
    if os.geteuid() != 0:
        pytest.skip("a single-node Slurm needs root")
    ensure_installed()
    ensure_munge()
    conf = write_conf(root)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env, timeout=60)
    subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env, timeout=60)
    deadline = time.time() + 60
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
        if out.stdout.strip() in ("idle", "mixed"):
            return env
        time.sleep(1)
    raise RuntimeError(f"Slurm did not come up: {(root / 'slurmctld.log').read_text()[-2000:]}")


def stop_slurm(root: Path, env: dict) -> None:
    """Cancel what is left, let slurmd clean its steps up, then stop the daemons."""
    subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True, timeout=60)
    deadline = time.time() + 60
    while time.time() < deadline:
        queue = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip()
        if not queue:
            break
        time.sleep(1)
    for name in ("slurmd.pid", "slurmctld.pid"):
        pid_file = root / name
        if pid_file.is_file():
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except (ProcessLookupError, ValueError):
                pass
