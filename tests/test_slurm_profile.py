"""The SLURM profile builds the right submissions, checked without a cluster.

Stand-ins for the SLURM commands (sbatch records its arguments; squeue reports every job failed)
let the real executor plugin build and "submit" one job of each pipeline stage: each stage gets a
dataset whose upstream outputs already exist, so all of them are submitted in the first wave.
tests/test_slurm_cluster.py runs the tiling stage on a real single-node SLURM instead, where one
can be started.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from helpers import DEMO_SLIDE, REPO

PROFILE = REPO / "profiles" / "slurm"
INPUT_ID = "cmu_small_region"
SLURM_ENV = {"RLDIFF_SLURM_ACCOUNT": "rldiff_test", "RLDIFF_SLURM_PARTITION": "cpu_part",
             "RLDIFF_SLURM_GPU_PARTITION": "gpu_part", "RLDIFF_SLURM_GPU_MODEL": "h100"}

pytestmark = pytest.mark.slurm

pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install -e '.[cluster]' for the SLURM plugin")

# One script plays every SLURM command the plugin calls, by the name it was called with.
FAKE_SLURM = textwrap.dedent("""\
    #!{python}
    import json, os, sys
    from pathlib import Path
    state = Path(os.environ["FAKE_SLURM_DIR"])
    command, args = Path(sys.argv[0]).name, sys.argv[1:]
    submitted = state / "sbatch.jsonl"
    if command == "sbatch":
        job_id = 1000 + (len(submitted.read_text().splitlines()) if submitted.exists() else 0)
        with submitted.open("a") as log:
            log.write(json.dumps({{"id": job_id, "args": args}}) + "\\n")
        print(job_id)
    elif command in ("squeue", "sacct") and "--name" in " ".join(args):
        for line in submitted.read_text().splitlines() if submitted.exists() else []:
            print(f"{{json.loads(line)['id']}}|FAILED")  # nothing runs: every job ends failed
    elif command == "sacctmgr":
        print("rldiff_test")
    elif command == "sinfo":
        print("cpu_part*\\ngpu_part")
    elif command == "scontrol":
        print("MinJobAge = 600 sec")
""")
SLURM_COMMANDS = ("sbatch", "squeue", "sacct", "sacctmgr", "sshare", "sinfo", "scontrol", "scancel", "srun")


def fake_slurm_bin(folder: Path) -> Path:
    folder.mkdir()
    script = folder / "fake_slurm"
    script.write_text(FAKE_SLURM.format(python=sys.executable))
    script.chmod(0o755)
    for command in SLURM_COMMANDS:
        (folder / command).symlink_to(script)
    return folder


def make_upstream(work: Path, dataset: str, stages: list[str]) -> None:
    """Placeholder outputs of the stages before the one under test, oldest first, so Snakemake
    schedules only that stage's job."""
    out = work / "out"
    now = time.time()
    paths = {"tiles": [out / "tiles" / dataset / "inputs" / INPUT_ID],
             # the tile_dataset checkpoint: the later stages' jobs are planned from its status table
             "summary": [out / "tiles" / dataset / "status.tsv", out / "tiles" / dataset / "manifest.parquet"],
             "embeddings": [out / "embeddings" / dataset / "inputs" / INPUT_ID / "manifest.parquet"],
             "latents": [out / "latents" / dataset / "inputs" / INPUT_ID / "manifest.parquet"]}
    for age, stage in enumerate(stages):
        for path in paths[stage]:
            if stage == "tiles":
                path.mkdir(parents=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"input_id\tsource\tstatus\treason\tpatch_count\tmessage\n"  # as tile-summary writes it
                                f"{INPUT_ID}\t{INPUT_ID}.svs\tdone\t\t1\t\n" if path.suffix == ".tsv" else "")
            os.utime(path, (now + age, now + age))  # after the slide, before the next stage


def write_config(work: Path, datasets: list[str], devices: int) -> Path:
    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    config["output_dir"] = "out"
    template = config["datasets"]["demo_he_20x"]
    config["datasets"] = {name: {**template, "inputs": [str(DEMO_SLIDE)]} for name in datasets}
    config["training"]["devices"] = devices
    # The demo trains its autoencoder on demo_he_20x, which these datasets replace; a random one keeps
    # the jobs under test the four stages' (train_autoencoder's routing: the --forceall dry run below).
    config["latents"]["autoencoder"] = {"kind": "random", "preset": "tiny-vq-f16", "allow_random_weights": True}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def submissions_by_rule(state: Path) -> dict[str, list[str]]:
    """sbatch arguments of each submitted job, by rule name (from the plugin's --comment)."""
    by_rule = {}
    for line in (state / "sbatch.jsonl").read_text().splitlines():
        args = json.loads(line)["args"]
        comment = args[args.index("--comment") + 1]
        by_rule[re.match(r"rule_([a-z_]+?)(?:_wildcards_.*)?$", comment).group(1)] = args
    return by_rule


@pytest.fixture(scope="module")
def submitted(tmp_path_factory) -> dict[str, list[str]]:
    work = tmp_path_factory.mktemp("slurm_profile")
    state = work / "state"
    state.mkdir()
    fake_bin = fake_slurm_bin(work / "bin")
    config = write_config(work, ["tiled", "embedded", "encoded", "trained"], devices=4)
    make_upstream(work, "embedded", ["tiles"])
    make_upstream(work, "encoded", ["tiles", "embeddings"])
    make_upstream(work, "trained", ["tiles", "summary", "embeddings", "latents"])
    targets = ["out/tiles/tiled/inputs/" + INPUT_ID,
               f"out/embeddings/embedded/inputs/{INPUT_ID}/manifest.parquet",
               f"out/latents/encoded/inputs/{INPUT_ID}/manifest.parquet",
               "out/training/trained/done.json"]
    env = {**os.environ, **SLURM_ENV, "PATH": f"{fake_bin}:{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state)}
    env.pop("SLURM_JOB_ID", None)
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--profile", str(PROFILE),
         "--configfile", str(config), "--directory", str(work), "--slurm-init-seconds-before-status-checks", "1",
         "--seconds-between-status-checks", "1", "--slurm-status-command", "squeue", *targets],
        cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert (state / "sbatch.jsonl").exists(), result.stderr[-3000:]
    by_rule = submissions_by_rule(state)
    assert set(by_rule) == {"tile_input", "embed_input", "latents_input", "train_dataset"}, result.stderr[-3000:]
    return by_rule


def option(args: list[str], flag: str) -> str | None:
    """The value of ``flag`` (`-p X` or `--flag=X`) in an sbatch argument list."""
    for index, arg in enumerate(args):
        if arg == flag:
            return args[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


# rule -> expected sbatch options (None: must be absent). Memory and wall time come from the rules.
EXPECTED = {
    "tile_input": {"-p": "cpu_part", "-A": "rldiff_test", "--mem": "4000", "-t": "120", "--cpus-per-task": "1",
                   "--ntasks": "1", "--gpus": None, "--nodes": None},
    "embed_input": {"-p": "gpu_part", "-A": "rldiff_test", "--mem": "16000", "-t": "240", "--gpus": "h100:1",
                    "--cpus-per-gpu": "8", "--cpus-per-task": None},
    "latents_input": {"-p": "gpu_part", "-A": "rldiff_test", "--mem": "16000", "-t": "240", "--gpus": "h100:1",
                      "--cpus-per-gpu": "8"},
    # several GPUs of one node and a single task: Lightning starts one process per GPU
    "train_dataset": {"-p": "gpu_part", "-A": "rldiff_test", "--mem": "64000", "-t": "2880", "--gpus": "h100:4",
                      "--nodes": "1", "--cpus-per-gpu": "8", "--ntasks": None, "--ntasks-per-gpu": None},
}


@pytest.mark.parametrize("rule", sorted(EXPECTED))
def test_each_stage_is_submitted_with_its_resources(submitted, rule):
    args = submitted[rule]
    for flag, value in EXPECTED[rule].items():
        assert option(args, flag) == value, f"{rule}: {flag} is {option(args, flag)!r}, expected {value!r}: " \
                                            f"{shlex.join(args)}"
    wrapped = option(args, "--wrap")
    assert f"--target-jobs '{rule}:" in wrapped and f"--allowed-rules {rule}" in wrapped  # that rule only


def dry_run_resources(*args: str, cwd: Path = REPO) -> dict[str, list[dict[str, str]]]:
    """Resources of every job of a dry run, by rule (parsed from Snakemake's job listing)."""
    env = {**os.environ, **SLURM_ENV}
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                             "--profile", str(PROFILE), "-n", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs: dict[str, list[dict[str, str]]] = {}
    rule = None
    for line in result.stdout.splitlines():
        if match := re.match(r"^(?:local)?rule (\w+):", line):
            rule = match.group(1)
        elif rule and (match := re.match(r"^\s+resources: (.*)$", line)):
            jobs.setdefault(rule, []).append(dict(item.split("=", 1) for item in match.group(1).split(", ")))
    return jobs


def test_every_gpu_rule_goes_to_the_gpu_partition(tmp_path):
    """Generic over the workflow, so GPU rules added later must be routed in the profile too. Two dry
    runs: from nothing (tiling and the per-dataset rules), and after the tiling checkpoint (the
    per-input embedding and latents jobs it plans)."""
    jobs = dry_run_resources("--forceall")
    config = write_config(tmp_path, ["tiled"], devices=1)
    make_upstream(tmp_path, "tiled", ["tiles", "summary"])
    for rule, resources in dry_run_resources("--configfile", str(config), "--directory", str(tmp_path),
                                             cwd=tmp_path).items():
        jobs.setdefault(rule, []).extend(resources)
    assert {"tile_input", "embed_input", "train_autoencoder", "latents_input", "train_dataset"} <= set(jobs)
    for rule, resources in jobs.items():
        for job in resources:
            wants_gpu = int(job.get("gpu", 0)) > 0
            assert job["slurm_partition"] == ("gpu_part" if wants_gpu else "cpu_part"), (rule, job)
            assert job["slurm_account"] == "rldiff_test" and int(job["runtime"]) > 0 and int(job["mem_mb"]) > 0
            if wants_gpu:
                assert job["gpu_model"] == "h100" and int(job["cpus_per_gpu"]) > 0, (rule, job)
