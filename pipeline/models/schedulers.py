"""The diffusers schedulers the samplers can use, built on a model's own training schedule.

One table for patch sampling and the large-image sampler alike; each use says which prediction it
feeds the scheduler (the UNet's epsilon for patches, the fused canvas x0 for large images) and how
the timesteps are spaced.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, UniPCMultistepScheduler

# name -> (scheduler class, settings on top of the model's training schedule)
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    # PLMS is PNDM without its Runge-Kutta warm-up steps, as in CompVis' PLMSSampler.
    "plms": (PNDMScheduler, {"skip_prk_steps": True}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
}


def build_scheduler(name: str, training_schedule: Mapping[str, Any], steps: int, *, prediction_type: str,
                    timestep_spacing: str, steps_offset: int = 0, final_alpha_is_one: bool = False):
    """Scheduler `name` with `steps` timesteps set.

    final_alpha_is_one: for the schedulers that have the option (DDIM, PNDM), whether the last
    step lands on alpha-bar 1 (fully denoised) or, as CompVis does, on alpha-bar of timestep 0.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"sampler {name!r}: expected one of {sorted(SCHEDULERS)}")
    scheduler_class, settings = SCHEDULERS[name]
    options = {**training_schedule, **settings, "prediction_type": prediction_type,
               "timestep_spacing": timestep_spacing, "steps_offset": steps_offset}
    if "set_alpha_to_one" in inspect.signature(scheduler_class.__init__).parameters:
        options["set_alpha_to_one"] = final_alpha_is_one
    scheduler = scheduler_class.from_config(options)
    scheduler.set_timesteps(steps)
    return scheduler
