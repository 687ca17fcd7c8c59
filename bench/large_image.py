"""Large images: UNet evaluations, seconds, peak memory and seam score per size and mode.

Every run goes through the stage's own code (``pipeline.sampling.stage.generate_region``): sample
the latent canvas, decode it window by window into a memmap on disk, write the pyramidal TIFF
(and the PNG up to 4096 px), score the seams. Modes are ``large_image_config(mode, window)``, as
the workflow builds them; ``--set key=value`` overrides settings for every run.

Models (all randomly initialised unless a folder is given; evaluation counts and memory depend
only on the architecture, seam scores of random models only on the method's geometry):

* ``small``: the ``small`` training preset on the random tiny VQ-f16 (16x16-latent windows, 256 px
  each): the demo's model, cheap enough for 4096 px and 8192 px on a CPU;
* ``lid-random``: LID's full-size UNet on a random full-size VQ-f4 (64x64-latent windows),
  for GPU timings comparable with LID's ~60 s per 1024 px image;
* a folder: a pipeline export (``model_index.json``) or a LID release folder, e.g. the fixture.

The embedding grid is a fixed random Gaussian [k, k, D] (seeded), the same for both modes.
Peak memory: on CPU the growth of the process's peak resident set (VmHWM, reset before each run)
over its resident set before the run; on CUDA ``torch.cuda.max_memory_allocated``.

    .venv/bin/python bench/large_image.py                                  # small model, CPU
    .venv/bin/python bench/large_image.py --runs 8192:fast                 # bounded memory at 8192 px
    .venv/bin/python bench/large_image.py --model lid-random --device cuda --runs 1024:lid,fast
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, VQModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.models import RLDiffPipeline, load_pipeline  # noqa: E402
from pipeline.models.autoencoder import random_vq  # noqa: E402
from pipeline.models.presets import LID_FULL_SIZE, vq_kwargs  # noqa: E402
from pipeline.sampling.config import large_image_config  # noqa: E402
from pipeline.sampling.stage import generate_region  # noqa: E402
from pipeline.training.config import TrainConfig  # noqa: E402
from pipeline.training.module import LatentDiffusion  # noqa: E402

DEFAULT_RUNS = ["1024:lid,fast", "2048:lid,fast", "4096:fast"]


def random_model(preset: str, embedding_dim: int) -> RLDiffPipeline:
    torch.manual_seed(0)
    if preset == "small":
        config = TrainConfig(preset="small", latent_size=16, patch_embed_dim=embedding_dim)
        vae = random_vq("tiny-vq-f16", seed=0, allow_random_weights=True).model
    else:
        config = TrainConfig(preset="lid", latent_size=64, patch_embed_dim=embedding_dim)
        vae = VQModel(**vq_kwargs(LID_FULL_SIZE.vq, 1.0))
    module = LatentDiffusion(config)
    unet, condition = module.export_models(False)
    return RLDiffPipeline(unet=unet.eval(), vae=vae.eval(), condition=condition.eval(),
                          scheduler=DDPMScheduler.from_config(config.scheduler_config()),
                          provenance={"random_weights": ["unet", "condition", "autoencoder"]})


def resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    except OSError:
        pass


def parse_runs(specs: list[str]) -> list[tuple[int, str]]:
    runs = []
    for spec in specs:
        size, modes = spec.split(":")
        runs.extend((int(size), mode) for mode in modes.split(","))
    return runs


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="small | lid-random | a model folder")
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="SIZE:MODE[,MODE] (pixels per side)")
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides of LargeImageConfig")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--embedding-dim", type=int, default=384)
    parser.add_argument("--window-batch", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "large_image.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.model in ("small", "lid-random"):
        model = random_model(args.model, args.embedding_dim)
    else:
        model = load_pipeline(args.model)
    model.to(device)
    overrides = dict(item.split("=", 1) for item in args.set)
    overrides = {key: parse_value(value) for key, value in overrides.items()}
    if args.window_batch:
        overrides["window_batch"] = args.window_batch
    patch = model.latent_size * model.downsampling_factor
    results = []
    for size, mode in parse_runs(args.runs):
        if size % patch:
            raise SystemExit(f"size {size} is not a multiple of the model's {patch}-pixel window")
        k = size // patch
        config = large_image_config(mode, model.latent_size, overrides)
        grid = np.random.default_rng(k).standard_normal((k, k, model.embedding_dim)).astype(np.float32)
        with tempfile.TemporaryDirectory(dir=Path(args.out).parent) as folder:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rss_before = resident_kib("VmRSS")
            reset_peak()
            started = time.perf_counter()
            record = generate_region(model, grid, np.zeros((8, 8, 3), np.uint8), Path(folder), config,
                                     0.5, 4096, True)
            seconds = time.perf_counter() - started
            peak_growth_mib = (resident_kib("VmHWM") - rss_before) / 1024
            tiff_bytes = (Path(folder) / "generated.tif").stat().st_size
        entry = {
            "size": size, "k": k, "mode": mode, "sampler": config.sampler, "steps": config.steps,
            "stride": config.stride, "decode_stride": config.decode_stride, "window": config.window,
            "shift_windows": config.shift_windows, "fusion_weights": config.fusion_weights, "windows_per_step": record["windows"],
            "unet_evaluations": record["unet_evaluations"], "unet_calls": record["unet_calls"],
            "sampling_seconds": record["sampling_seconds"], "decode_seconds": record["decode_seconds"],
            "total_seconds": round(seconds, 3), "seam_score": round(record["seam_score"], 4),
            "peak_rss_growth_mib": round(peak_growth_mib, 1),
            "full_image_float32_mib": round(size * size * 3 * 4 / 2**20, 1),
            "tiff_mib": round(tiff_bytes / 2**20, 2),
        }
        if device.type == "cuda":
            entry["cuda_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        results.append(entry)
        print(json.dumps(entry), flush=True)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                    f"{platform.processor() or platform.machine()})")
    report = {"machine": machine, "torch": torch.__version__, "model": model.source,
              "overrides": overrides, "runs": results, "date": time.strftime("%Y-%m-%d %H:%M")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
