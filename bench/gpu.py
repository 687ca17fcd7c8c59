"""Every GPU figure in one run (bench/gpu.sh calls it): UNet throughput, large images, training.

Sections (each writes its figures into one JSON; random weights throughout: the cost of a model
depends on its architecture only):

* ``unet``: LID's full-size UNet (preset ``lid``: 192 channels, [1,2,3,5], 64x64 latents), UNet
  evaluations/s at several batch sizes in float32 and bfloat16 autocast, with guidance's context;
  FLOPs per evaluation counted by torch's FlopCounterMode, model FLOPs utilisation against the
  card's peak (``--peak-tflops``, bf16 dense; H100/H200 SXM: 989) and peak memory.
* ``large_image``: seconds per image through the stage's own sampler and decoder
  (``LargeImageSampler`` + ``decode_canvas``), LID's UNet on a random VQ-f4: 1024 px in lid mode
  and fast mode, 4096 px in fast mode; window chunks sized from free memory; bf16 (precision auto).
* ``training``: optimizer steps/s and peak memory of the ``lid`` preset at batch 100, bf16
  autocast (as Lightning's bf16-mixed), synthetic latents already on the device.

``--dry-run`` runs every section at a tiny size (the ``small`` preset, 16-latent windows, two
steps) on whatever device there is: it checks the code paths, not the figures.

    python bench/gpu.py --out bench/results/gpu.json
    python bench/gpu.py --dry-run --device cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, VQModel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.io.precision import autocast  # noqa: E402
from pipeline.models import RLDiffPipeline  # noqa: E402
from pipeline.models.autoencoder import random_vq  # noqa: E402
from pipeline.models.presets import LID_FULL_SIZE, vq_kwargs  # noqa: E402
from pipeline.sampling import LargeImageSampler, decode_canvas  # noqa: E402
from pipeline.sampling.config import large_image_config  # noqa: E402
from pipeline.training.config import TrainConfig  # noqa: E402
from pipeline.training.module import LatentDiffusion  # noqa: E402

EMBEDDING_DIM = 384  # HIPT ViT-S/16, the BRCA 20x conditioning


def model(dry_run: bool, device: torch.device) -> tuple[RLDiffPipeline, TrainConfig]:
    torch.manual_seed(0)
    if dry_run:
        config = TrainConfig(preset="small", latent_size=16, patch_embed_dim=EMBEDDING_DIM)
        vae = random_vq("tiny-vq-f16", seed=0, allow_random_weights=True).model
    else:
        config = TrainConfig(preset="lid", latent_size=64, patch_embed_dim=EMBEDDING_DIM)
        vae = VQModel(**vq_kwargs(LID_FULL_SIZE.vq, 1.0))
    unet, condition = LatentDiffusion(config).export_models(False)
    pipe = RLDiffPipeline(unet=unet.eval(), vae=vae.eval(), condition=condition.eval(),
                          scheduler=DDPMScheduler.from_config(config.scheduler_config()))
    return pipe.to(device), config


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def unet_section(pipe: RLDiffPipeline, device: torch.device, batches: list[int], repeats: int,
                 peak_tflops: float) -> dict:
    size, channels = pipe.latent_size, pipe.latent_channels
    context = pipe.condition(torch.zeros(1, pipe.embedding_dim, device=device))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        pipe.unet(torch.zeros(1, channels, size, size, device=device), torch.full((1,), 500.0, device=device),
                  encoder_hidden_states=context)
    flops = counter.get_total_flops()
    rows = []
    for precision, layout in (("float32", torch.contiguous_format), ("bfloat16", torch.contiguous_format),
                              ("bfloat16", torch.channels_last)):
        pipe.unet.to(memory_format=layout)
        for batch in batches:
            x = torch.randn(batch, channels, size, size, device=device).contiguous(memory_format=layout)
            t = torch.full((batch,), 500.0, device=device)
            c = context.expand(batch, -1, -1)
            reset_peak(device)
            with torch.no_grad(), autocast(precision, device):
                pipe.unet(x, t, encoder_hidden_states=c)  # warm-up: kernels, allocator
                synchronize(device)
                started = time.perf_counter()
                for _ in range(repeats):
                    pipe.unet(x, t, encoder_hidden_states=c)
                synchronize(device)
            seconds = time.perf_counter() - started
            rate = batch * repeats / seconds
            rows.append({"precision": precision, "channels_last": layout == torch.channels_last, "batch": batch,
                         "evaluations_per_s": round(rate, 2),
                         "mfu_of_bf16_peak": round(rate * flops / (peak_tflops * 1e12), 4),
                         "peak_memory_mib": peak_memory_mib(device)})
            print(json.dumps({"unet": rows[-1]}), flush=True)
    pipe.unet.to(memory_format=torch.contiguous_format)  # the other sections measure the default layout
    return {"flops_per_evaluation": flops, "peak_tflops": peak_tflops, "rows": rows}


def large_image_section(pipe: RLDiffPipeline, device: torch.device, runs: list[tuple[int, str]],
                        steps: int | None, flops: int, peak_tflops: float) -> list[dict]:
    patch = pipe.latent_size * pipe.downsampling_factor
    rows = []
    for side, mode in runs:
        k = side // patch
        config = large_image_config(mode, pipe.latent_size, {"steps": steps} if steps else None)
        grid = np.random.default_rng(k).standard_normal((k, k, pipe.embedding_dim)).astype(np.float32)
        reset_peak(device)
        synchronize(device)
        started = time.perf_counter()
        sampler = LargeImageSampler(pipe, grid, config)
        latent, stats = sampler.sample()
        synchronize(device)
        sampled = time.perf_counter() - started
        image = decode_canvas(pipe, latent, config)
        synchronize(device)
        total = time.perf_counter() - started
        rows.append({"side_px": side, "mode": mode, "image": list(image.shape), "unet_evaluations": stats.unet_evaluations,
                     "windows_per_call": sampler.fusion.window_batch, "sampling_s": round(sampled, 2),
                     "total_s": round(total, 2),
                     "mfu_of_bf16_peak": round(stats.unet_evaluations * flops / sampled / (peak_tflops * 1e12), 4),
                     "peak_memory_mib": peak_memory_mib(device)})
        print(json.dumps({"large_image": rows[-1]}), flush=True)
    return rows


def training_section(config: TrainConfig, device: torch.device, batch: int, steps: int, flops: int,
                     peak_tflops: float) -> dict:
    module = LatentDiffusion(config).to(device).train()
    optimizer = torch.optim.AdamW([*module.unet.parameters(), *module.condition.parameters()], lr=1e-4)
    size = config.latent_size
    batch_data = {"latents": torch.randn(batch, config.latent_channels, size, size, device=device),
                  "noise": torch.randn(batch, config.latent_channels, size, size, device=device),
                  "timesteps": torch.randint(0, 1000, (batch,), device=device),
                  "embeddings": torch.randn(batch, config.patch_embed_dim, device=device),
                  "drop": torch.rand(batch, device=device) < config.cfg_dropout}
    precision = "bfloat16" if device.type == "cuda" else "float32"

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, device):
            loss = module.diffusion_loss(batch_data)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    reset_peak(device)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    rate = steps / (time.perf_counter() - started)
    # forward + backward ~ 3x the forward's FLOPs
    result = {"preset": config.preset, "batch": batch, "precision": precision, "steps_per_s": round(rate, 3),
              "mfu_of_bf16_peak": round(rate * batch * 3 * flops / (peak_tflops * 1e12), 4),
              "peak_memory_mib": peak_memory_mib(device)}
    print(json.dumps({"training": result}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry-run", action="store_true", help="every section at a tiny size: checks code paths")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense bf16 peak")
    parser.add_argument("--sections", nargs="+", default=["unet", "large_image", "training"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # random weights, Lightning hints: fine for timing
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    pipe, config = model(args.dry_run, device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d %H:%M")}
    unet = unet_section(pipe, device, [1, 2] if args.dry_run else [8, 32, 64, 128, 256],
                        1 if args.dry_run else 5, args.peak_tflops)
    flops = unet["flops_per_evaluation"]
    if "unet" in args.sections:
        report["unet"] = unet
    if "large_image" in args.sections:
        runs = [(512, "lid"), (512, "fast")] if args.dry_run else [(1024, "lid"), (1024, "fast"), (4096, "fast")]
        report["large_image"] = large_image_section(pipe, device, runs, 2 if args.dry_run else None, flops,
                                                    args.peak_tflops)
    if "training" in args.sections:
        report["training"] = training_section(config, device, 2 if args.dry_run else 100, 1 if args.dry_run else 10,
                                              flops, args.peak_tflops)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
