"""The RANDOM WEIGHTS notice that every asset showing results of randomly initialised models
carries on itself (a reader may see an asset without its caption)."""

from __future__ import annotations

from collections.abc import Sequence

RANDOM_BANNER = ("RANDOM WEIGHTS: {what} randomly initialised (a demo or test run). These results show that "
                 "the pipeline runs end to end; they say nothing about image quality.")
# What a sampling stage's `random_weights` flag means where no `random_parts` says more (older
# outputs): the model's first stage came from a random preset.
RANDOM_AUTOENCODER = "the diffusion model's autoencoder"


def model_parts(parts: Sequence[str]) -> list[str]:
    """A model's `random_parts` record (e.g. ["autoencoder", "conditioning encoder hipt_vit_s16"]) in words."""
    return [RANDOM_AUTOENCODER if part == "autoencoder" else f"the {part}" for part in parts]


def random_notice(what: Sequence[str]) -> str:
    """The RANDOM WEIGHTS sentence naming what was randomly initialised ("" when nothing was)."""
    if not what:
        return ""
    names = what[0] if len(what) == 1 else f"{', '.join(what[:-1])} and {what[-1]}"
    return RANDOM_BANNER.format(what=f"{names} {'is' if len(what) == 1 else 'are'}")
