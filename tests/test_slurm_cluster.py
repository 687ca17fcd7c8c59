"""The tiling stage through the SLURM profile on a real single-node SLURM started for this test.

munged, slurmctld and slurmd run from a private folder (own config, munge socket, ports), as
children of the test. Where SLURM is not installed (`apt-get install slurm-wlm munge`) or its
daemons cannot start, the test is skipped with the reason; tests/test_slurm_profile.py checks the
profile's submissions without a cluster.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import DEMO_SLIDE, REPO, make_spec
from pipeline.tiling.outputs import tile_input
from pipeline.tiling.slide import open_slide_source

pytestmark = pytest.mark.slurm

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "srun", "sinfo")
START_TIMEOUT_S = 30

pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install -e '.[cluster]' for the SLURM plugin")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def slurm_conf(folder: Path, node: str) -> str:
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return f"""\
ClusterName=rldiff-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={os.environ.get("USER", "root")}
AuthType=auth/munge
AuthInfo=socket={folder}/munge.socket
CredType=cred/munge
StateSaveLocation={folder}/ctld
SlurmdSpoolDir={folder}/d
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
# Finished jobs stay visible to squeue, which the plugin polls (there is no accounting database).
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def log_tail(folder: Path) -> str:
    return "\n".join(f"{log.name}: {log.read_text(errors='replace')[-600:]}" for log in sorted(folder.glob("*.log")))


@pytest.fixture(scope="module")
def slurm():
    """Environment variables for SLURM clients talking to the private single-node cluster."""
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"SLURM is not installed here ({', '.join(missing)} not on PATH; "
                    "apt-get install slurm-wlm munge)")
    # A short path: the munge socket's name must fit a Unix socket address (108 bytes).
    folder = Path(tempfile.mkdtemp(prefix="rldiff-slurm-"))
    folder.chmod(0o700)
    (folder / "ctld").mkdir()
    (folder / "d").mkdir()
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    node = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, node))
    # The jobstep plugin drops every SLURM_* variable, SLURM_CONF included, before its nested srun:
    # a real cluster's clients read /etc/slurm/slurm.conf, this private one needs a wrapper.
    wrappers = folder / "bin"
    wrappers.mkdir()
    (wrappers / "srun").write_text(f'#!/bin/sh\nSLURM_CONF={conf} exec {shutil.which("srun")} "$@"\n')
    (wrappers / "srun").chmod(0o755)
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": f"{wrappers}:{os.environ['PATH']}"}
    commands = [
        ["munged", "-F", "-f", f"--socket={folder}/munge.socket", f"--key-file={key}",
         f"--log-file={folder}/munged.log", f"--pid-file={folder}/munged.pid", f"--seed-file={folder}/munged.seed"],
        ["slurmctld", "-D", "-i", "-f", str(conf)],
        ["slurmd", "-D", "-N", node, "-f", str(conf)],
    ]
    daemons = []
    try:
        for command in commands:
            daemons.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                            stderr=open(folder / f"{command[0]}.stderr.log", "w")))
            time.sleep(1)
        deadline = time.monotonic() + START_TIMEOUT_S
        state = ""
        while time.monotonic() < deadline:
            exited = [command[0] for command, daemon in zip(commands, daemons) if daemon.poll() is not None]
            if exited:
                pytest.skip(f"SLURM daemons could not start here ({', '.join(exited)} exited):\n{log_tail(folder)}")
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            if state.strip() == "idle":
                break
            time.sleep(1)
        else:
            pytest.skip(f"the SLURM node did not become idle in {START_TIMEOUT_S} s (sinfo: {state.strip()!r}):\n"
                        f"{log_tail(folder)}")
        yield env
    finally:
        for daemon in reversed(daemons):  # only the processes this fixture started
            daemon.terminate()
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        shutil.rmtree(folder, ignore_errors=True)


def test_tiling_stage_runs_through_the_slurm_profile(slurm, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"output_dir": "out", "datasets": {"demo": {
        "kind": "wsi", "resolution": "20x", "image_format": "png", "patches_per_shard": 8,
        "inputs": [str(DEMO_SLIDE), str(tmp_path / "missing slide.svs")]}}}))
    env = {**slurm, "RLDIFF_SLURM_ACCOUNT": "", "RLDIFF_SLURM_PARTITION": "debug",
           "RLDIFF_SLURM_GPU_PARTITION": "debug", "RLDIFF_SLURM_GPU_MODEL": ""}
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--profile",
         str(REPO / "profiles" / "slurm"), "--configfile", str(config), "--directory", str(tmp_path),
         "--slurm-no-account", "--slurm-keep-successful-logs", "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
         "--seconds-between-status-checks", "2", "--latency-wait", "5", "tile"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    # Every job went through SLURM: one batch log per job, by rule and wildcards.
    slurm_logs = tmp_path / ".snakemake" / "slurm_logs"
    assert {p.name for p in slurm_logs.iterdir()} >= {"rule_tile_input", "rule_tile_dataset"}
    assert len(list((slurm_logs / "rule_tile_input").rglob("*.log"))) == 2
    jobs = subprocess.run(["squeue", "--states=all", "-h", "-o", "%T"], env=slurm, capture_output=True, text=True)
    assert jobs.stdout.split().count("COMPLETED") >= 3, jobs.stdout
    status = pd.read_csv(tmp_path / "out/tiles/demo/status.tsv", sep="\t").set_index("input_id")
    assert (status.loc["missing-slide", "status"], status.loc["missing-slide", "reason"]) == ("error", "not_found")
    assert status.loc["cmu_small_region", "status"] == "done"
    # The same shards as tiling in this process.
    slurm_tiles = tmp_path / "out/tiles/demo/inputs/cmu_small_region"
    spec = make_spec(name="demo", inputs={"cmu_small_region": str(DEMO_SLIDE)}, patches_per_shard=8)
    tile_input(spec, "cmu_small_region", DEMO_SLIDE, tmp_path / "local", open_slide_source)
    shards = sorted(p.name for p in (tmp_path / "local").glob("*.tar"))
    assert shards and shards == sorted(p.name for p in slurm_tiles.glob("*.tar"))
    for name in shards + ["manifest.parquet"]:
        assert (slurm_tiles / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
