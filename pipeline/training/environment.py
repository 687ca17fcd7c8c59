"""Who starts the training processes: SLURM (one task per GPU) or Lightning itself.

Lightning picks its cluster environment by looking at the process environment. Inside any SLURM
allocation (``SLURM_NTASKS`` set, job name not ``bash``/``interactive``) it chooses
``SLURMEnvironment``, which assumes that ``srun`` started one task per device and takes world size
and ranks from SLURM; it then never starts processes itself. Snakemake's SLURM executor runs a
rule's command as a single task (``srun -n1 ...``), so for a 4-GPU rule Lightning would either
refuse (``--ntasks-per-node=1`` does not match ``devices=4``) or wait forever for 3 ranks nobody
starts. :func:`choose_cluster_environment` makes the decision explicit:

==========================================  =============  ======================================
environment                                 decision       processes started by
==========================================  =============  ======================================
torchrun / TorchElastic variables present   ``auto``       torchrun (Lightning detects it)
no SLURM, or an interactive SLURM shell     ``lightning``  Lightning (DDP subprocess launcher)
SLURM tasks == devices x nodes              ``slurm``      srun, one task per device
one SLURM task, one node, any devices       ``lightning``  Lightning, on this node's GPUs
anything else (e.g. 2 tasks for 4 GPUs)     error          (the message says what to change)
==========================================  =============  ======================================

``lightning`` means ``plugins=[LightningEnvironment()]``: Lightning spawns ``devices`` processes and
picks a free local port. The processes Lightning starts see the same SLURM variables plus
``LOCAL_RANK``; the same decision is taken there, so parent and children agree. ``slurm`` uses
``SLURMEnvironment(auto_requeue=False)``: a pre-emption is handled by Snakemake re-running the job,
which resumes from ``last.ckpt``, not by Lightning requeueing the job behind Snakemake's back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.errors import PipelineError

TORCHELASTIC_VARS = ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")  # as TorchElasticEnvironment.detect
INTERACTIVE_JOB_NAMES = ("bash", "interactive")  # as Lightning's SLURM detection


class LaunchConfigError(PipelineError):
    """The SLURM task layout fits neither SLURM launching nor Lightning launching."""


@dataclass(frozen=True)
class LaunchDecision:
    environment: str  # "auto" | "lightning" | "slurm"
    reason: str


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:  # e.g. SLURM_TASKS_PER_NODE-style "2(x3)"; treat as unknown
        return None


def choose_cluster_environment(env: Mapping[str, str], devices: int, num_nodes: int = 1) -> LaunchDecision:
    """Decide who launches the ``devices x num_nodes`` training processes (see the module docstring)."""
    if all(name in env for name in TORCHELASTIC_VARS):
        return LaunchDecision("auto", "torchrun/TorchElastic variables are set; it started the processes")
    ntasks = _int(env, "SLURM_NTASKS")
    if ntasks is None or env.get("SLURM_JOB_NAME") in INTERACTIVE_JOB_NAMES:
        return LaunchDecision("lightning", "not a SLURM task (or an interactive SLURM shell): Lightning launches")
    wanted = devices * num_nodes
    per_node = _int(env, "SLURM_NTASKS_PER_NODE")
    nodes = _int(env, "SLURM_NNODES")
    if ntasks == wanted and (per_node is None or per_node == devices) and (nodes is None or nodes == num_nodes):
        return LaunchDecision("slurm", f"SLURM started {ntasks} task(s), one per device: SLURM sets the ranks")
    if ntasks == 1 and num_nodes == 1:
        return LaunchDecision(
            "lightning",
            f"one SLURM task (e.g. Snakemake's srun -n1) for {devices} device(s): Lightning starts the processes",
        )
    if ntasks == 1:
        raise LaunchConfigError(
            f"{num_nodes} nodes requested, but SLURM started a single task: multi-node training needs one task "
            f"per device (srun --nodes={num_nodes} --ntasks-per-node={devices}), or set num_nodes=1"
        )
    raise LaunchConfigError(
        f"SLURM started {ntasks} tasks (per node: {per_node}, nodes: {nodes}), but training wants "
        f"devices={devices} x num_nodes={num_nodes} = {wanted} processes: launch with "
        f"--ntasks-per-node={devices} --nodes={num_nodes}, or with a single task"
    )


def cluster_plugins(decision: LaunchDecision) -> list:
    """Lightning ``plugins`` for a decision (empty: let Lightning detect)."""
    from lightning.pytorch.plugins.environments import LightningEnvironment, SLURMEnvironment

    if decision.environment == "lightning":
        return [LightningEnvironment()]
    if decision.environment == "slurm":
        return [SLURMEnvironment(auto_requeue=False)]
    return []
