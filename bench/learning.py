"""Does the pipeline learn? Issue 15's learning benchmark, in four parts, on real data only:

1. the first stage (autoencoder): held-out PSNR/SSIM against the same model untrained and against
   a bicubic down-up at the same latent size;
2. the diffusion model trained on its latents: Fréchet distance of generated patches to held-out
   real patches (``fd_trained``) against the same model untrained (``fd_untrained``) and against the
   real-vs-real floor of two disjoint real sets of the same size (``fd_real_floor``), at every kept
   checkpoint (``fd_curve``);
3. condition following: each generated patch, embedded by the conditioning encoder, ranks its own
   condition among all conditions of the set (``retrieval_top1``/``top5`` against
   ``retrieval_chance``); mean cosine to its own condition against every mismatched pairing
   (``cosine_paired``, ``cosine_shuffled``);
4. the same for the 4-band NAIP quarter-quads (``naip``): reconstruction PSNR per band against
   bicubic per band, FD on RGB, retrieval.

Data and hold-out: bench/learning_data.py (H&E held out by whole source image, NAIP by ground);
parts 2-3: bench/learning_diffusion.py. The models are the demo's (``workflow_config.yaml``:
autoencoder table, small-preset UNet, ``training:`` table) with the step counts below; the FD uses
the evaluation stage's feature extractor (``evaluation.feature_extractor``: in the demo the
*randomly initialised* HIPT ViT-S/16, the same network as the conditioning encoder; named, with its
weights record, in the JSON).

Default run (full): autoencoders 800 steps (the demo's), the small-preset UNet for 4000 steps of
batch 8 (the demo's other `training:` settings: lr 1e-3, 20 warm-up steps, EMA 0.99) with a kept
checkpoint and an fd_curve point every 500 (9 points with step 0), DDIM 20 steps at guidance 2,
9 + 9 held-out H&E patches (A: conditions, B: reference; 44 trained on) and 10 + 10 held-out NAIP
patches of 128 px (50 trained on). ``--quick``: every code path at tiny size (10-step models,
2 DDIM steps, 3 + 3 patches).

    OMP_NUM_THREADS=2 .venv/bin/python bench/learning.py                         # full: about 15 minutes
    OMP_NUM_THREADS=1 .venv/bin/python bench/learning.py --quick --out /tmp/lq/learning.json   # 45 s
    .venv/bin/python bench/learning.py --parts 2 3 --diffusion-steps 600

Time, measured on the 2-core build machine at one torch thread (another job on the other core):
``--quick`` 45 s; a 100-step autoencoder / 200-step diffusion run of parts 2-4 at full sample
sizes 115 s, i.e. 0.14 s per autoencoder step (either data set), 0.09 s per diffusion step on
H&E (16x16 latents), 0.055 s on NAIP (8x8), 3.6 s and 2.7 s per fd_curve point, about 30 s of
tiling and set-up. The full run is therefore estimated at 2 x 112 s (autoencoders) + 360 s + 220 s
(diffusion) + 9 x 6.3 s (curves) + 30 s, about 15 minutes at one thread (two threads
were no faster on this shared machine: part 1's recorded 800 steps took 133.5 s at two). The JSON
records every part's seconds (``train_seconds``, ``diffusion.train_seconds``, ``measure_seconds``).

Writes JSON (each figure's meaning in ``meaning``, its sample counts in ``samples``), and beside it
contact sheets: ``.contact.png`` (part 1: real | reconstructed | bicubic), ``.generated.png``
(real | reconstructed | generated, one row per condition of set A) and ``.naip.png`` (the same, RGB).
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
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from learning_data import as_tensor, crops, heldout_pair, naip_patches, naip_spec, slide_patches  # noqa: E402
from learning_diffusion import CPU, DiffusionSettings, Stage, diffusion_figures  # noqa: E402

from pipeline.autoencoder.data import PatchSplit  # noqa: E402
from pipeline.autoencoder.metrics import (baseline_side, bicubic, bicubic_metrics, psnr_ssim, reconstruct,  # noqa: E402
                                          reconstruction_metrics)
from pipeline.autoencoder.run import fit, with_unit_latents  # noqa: E402
from pipeline.autoencoder.settings import AutoencoderTrainSettings  # noqa: E402
from pipeline.config import load_config, settings_from_table  # noqa: E402
from pipeline.evaluation.extractors import EncoderCache, build_extractor  # noqa: E402
from pipeline.evaluation.settings import EvaluationSettings  # noqa: E402
from pipeline.models.autoencoder import Autoencoder  # noqa: E402

FULL = {"ae_steps": None, "diffusion_steps": 4000, "curve_every": 500, "sampling_steps": 20, "per_set": 9,
        "naip_per_set": 10, "naip_patch": 128, "naip_heldout_columns": 2}
QUICK = {"ae_steps": 10, "diffusion_steps": 10, "curve_every": 5, "sampling_steps": 2, "per_set": 3,
         "naip_per_set": 3, "naip_patch": 128, "naip_heldout_columns": 2}

MEANING = {
    "psnr_ae/ssim_ae": "held-out reconstruction (encode -> decode) of the trained autoencoder, mean per patch",
    "psnr_untrained/ssim_untrained": "the same autoencoder at its initial weights (same seed)",
    "psnr_bicubic/ssim_bicubic": "each held-out patch down to as many numbers as the latent (bicubic) and back up",
    "fd_trained": "Fréchet distance between the features of patches generated by the trained model (one per "
                  "condition of held-out set A) and of held-out real set B",
    "fd_untrained": "the same for the same model and config at step 0 (untrained)",
    "fd_real_floor": "the same between real A and real B: what two disjoint real sets of this size score; "
                     "fd_trained near it = indistinguishable at this sample size",
    "fd_curve": "fd at step 0 and at every kept checkpoint",
    "retrieval_top1/top5": "share of generated patches whose own condition is the closest (top 1) / among the 5 "
                           "closest of all conditions of set A, by cosine of the conditioning encoder's embedding",
    "retrieval_chance": "the same for a random ranking: 1/N and min(5, N)/N",
    "cosine_paired": "mean cosine between a generated patch's embedding and its own condition",
    "cosine_shuffled": "mean cosine between a generated patch's embedding and every other condition of the set "
                       "(the expectation of a random shuffled pairing)",
    "untrained": "retrieval and cosines of the untrained model's patches",
    "naip.psnr_per_band": "part 1 per band (R, G, B, NIR) on the held-out NAIP patches; naip.fd_* on their RGB",
}


def first_stage_settings(config: dict, steps: int | None, in_channels: int) -> AutoencoderTrainSettings:
    table = dict(config["autoencoder"], **({"max_steps": steps} if steps else {}))
    return settings_from_table(AutoencoderTrainSettings, {**table, "accelerator": "cpu"}, "autoencoder",
                               in_channels=in_channels, seed=config["seed"])


def train_first_stage(settings: AutoencoderTrainSettings, split: PatchSplit, work: Path) -> dict:
    """The trained and the untrained autoencoder, both with unit-variance latents on the training patches."""
    started = time.perf_counter()
    module = fit(settings, split, work)
    seconds = time.perf_counter() - started
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        untrained = settings.build_model(int(split.train.shape[-1])).eval()
    model = with_unit_latents(module.export_model().eval(), split.train, settings.batch_size)
    with_unit_latents(untrained, split.train, settings.batch_size)
    return {"model": model, "untrained": untrained, "seconds": round(seconds, 1)}


def split_of(train: torch.Tensor, heldout: torch.Tensor, heldout_names) -> PatchSplit:
    return PatchSplit(train=train, train_keys=tuple(str(i) for i in range(len(train))),
                      heldout=heldout, heldout_keys=tuple(heldout_names))


def first_stage_figures(stages: dict, settings: AutoencoderTrainSettings, heldout: torch.Tensor) -> dict:
    size, batch = int(heldout.shape[-1]), settings.batch_size
    side = baseline_side(size, settings.downsampling, settings.latent_channels, int(heldout.shape[1]))
    return {**reconstruction_metrics(stages["model"], heldout, batch, "ae"),
            **reconstruction_metrics(stages["untrained"], heldout, batch, "untrained"),
            **bicubic_metrics(heldout, side), "bicubic_side": side,
            "latent_shape": [settings.latent_channels, size // settings.downsampling, size // settings.downsampling]}


def per_band_psnr(reconstructed: torch.Tensor, images_uint8: torch.Tensor, names: list[str]) -> dict[str, float]:
    target = images_uint8.float() / 255
    return {name: psnr_ssim(reconstructed[:, b:b + 1], target[:, b:b + 1])[0] for b, name in enumerate(names)}


def contact_sheet(real: torch.Tensor, recon: torch.Tensor, third: torch.Tensor, out: Path) -> None:
    """One row per patch: real (uint8) | reconstructed | third ([0, 1]), RGB."""
    rows = [torch.cat([real[i, :3].float() / 255, recon[i, :3], third[i, :3]], dim=-1) for i in range(len(real))]
    sheet = (torch.cat(rows, dim=-2).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(sheet).save(out)


def diffusion_stage(config: dict, autoencoder_model, extractor_name: str) -> Stage:
    """The pieces parts 2-4 share: the conditioning encoder and FD extractor as the stages build them."""
    evaluation = EvaluationSettings.from_dict({**config["evaluation"], "feature_extractor": extractor_name,
                                               "device": "cpu"})
    encoders = EncoderCache(config["encoders"], CPU)
    encoder_name = next(iter(config["datasets"]["demo_he_20x"]["encoders"]))
    autoencoder = Autoencoder(autoencoder_model, "kl", "bench/learning.py (trained here)")
    return Stage(autoencoder, encoders.get(encoder_name), build_extractor(extractor_name, evaluation, encoders),
                 config["training"])


def diffusion_settings(sizes: dict, seed: int) -> DiffusionSettings:
    return DiffusionSettings(max_steps=sizes["diffusion_steps"], curve_every=sizes["curve_every"],
                             sampling_steps=sizes["sampling_steps"], seed=seed)


def he_parts(args, config, specs, sizes, out: Path) -> dict:
    """Parts 1-3 on H&E."""
    train_crops, held_crops, held_names = crops(args.heldout_sources)
    slide = slide_patches(specs["demo_he_20x"])
    train = torch.cat([slide, as_tensor(train_crops)])
    settings = first_stage_settings(config, sizes["ae_steps"], 3)
    with tempfile.TemporaryDirectory() as tmp:
        stages = train_first_stage(settings, split_of(train, as_tensor(held_crops), held_names), Path(tmp) / "ae")
    result = {"train_patches": len(train), "train_sources": {"demo_slide_patches": len(slide),
                                                             "he_patches_256_crops": len(train_crops)},
              "heldout_by": "whole source image", "heldout_sources": args.heldout_sources,
              "autoencoder_settings": settings.to_dict(), "train_seconds": stages["seconds"]}
    if 1 in args.parts:
        held = as_tensor(held_crops)
        result.update(heldout_patches=len(held), **first_stage_figures(stages, settings, held))
        result["beats_bicubic"] = result["psnr_ae"] > result["psnr_bicubic"]
        contact_sheet(held, reconstruct(stages["model"], held, settings.batch_size),
                      bicubic(held, result["bicubic_side"]), out.with_suffix(".contact.png"))
    if {2, 3} & set(args.parts):
        pair = heldout_pair(args.heldout_sources, sizes["per_set"])
        stage = diffusion_stage(config, stages["model"], args.fd_extractor)
        with tempfile.TemporaryDirectory() as tmp:
            figures, generated = diffusion_figures(stage, train, pair, diffusion_settings(sizes, config["seed"]),
                                                   Path(tmp))
        figures["heldout_sets"] = pair.how
        result.update(figures, fd_extractor=stage.extractor.record,
                      conditioning_encoder={"name": stage.encoder.spec.name, **stage.encoder.record()})
        contact_sheet(pair.conditions, reconstruct(stages["model"], pair.conditions, settings.batch_size),
                      generated.float() / 255, out.with_suffix(".generated.png"))
    return result


def naip_part(args, config, sizes, out: Path) -> dict:
    """Part 4: the 4-band NAIP quarter-quads."""
    split = naip_patches(naip_spec(config, sizes["naip_patch"]), sizes["naip_heldout_columns"], sizes["naip_per_set"])
    held = torch.cat([split.heldout.conditions, split.heldout.reference])
    settings = first_stage_settings(config, sizes["ae_steps"], 4)
    with tempfile.TemporaryDirectory() as tmp:
        stages = train_first_stage(settings, split_of(split.train, held, range(len(held))), Path(tmp) / "ae")
    bands = ["R", "G", "B", "NIR"]
    figures = first_stage_figures(stages, settings, held)
    recon = reconstruct(stages["model"], held, settings.batch_size)
    result = {"data": "NAIP m_4709963_se_14_1 2019 and 2020 (R, G, B, NIR), tiled at 5 m, "
                      f"{sizes['naip_patch']} px patches", "heldout_by": "ground: " + split.heldout.how,
              "train_patches": len(split.train), "heldout_patches": len(held),
              "psnr_per_band": per_band_psnr(recon, held, bands),
              "psnr_per_band_untrained": per_band_psnr(reconstruct(stages["untrained"], held, settings.batch_size),
                                                       held, bands),
              "psnr_per_band_bicubic": per_band_psnr(bicubic(held, figures["bicubic_side"]), held, bands),
              **figures, "autoencoder_train_seconds": stages["seconds"]}
    stage = diffusion_stage(config, stages["model"], args.fd_extractor)
    with tempfile.TemporaryDirectory() as tmp:
        diffusion, generated = diffusion_figures(stage, split.train, split.heldout,
                                                 diffusion_settings(sizes, config["seed"]), Path(tmp))
    contact_sheet(split.heldout.conditions, recon[:len(split.heldout.conditions)], generated.float() / 255,
                  out.with_suffix(".naip.png"))
    return {**result, **diffusion, "fd_on": "RGB (bands 1-3) of generated and real patches"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    parser.add_argument("--quick", action="store_true",
                        help="every code path at tiny size (under a minute on one core)")
    parser.add_argument("--ae-steps", type=int, help="autoencoder steps (default: the demo's 800)")
    parser.add_argument("--diffusion-steps", type=int, help=f"default {FULL['diffusion_steps']}")
    parser.add_argument("--curve-every", type=int, help=f"default {FULL['curve_every']}")
    parser.add_argument("--sampling-steps", type=int, help=f"DDIM steps, default {FULL['sampling_steps']}")
    parser.add_argument("--fd-extractor", help="default: the config's evaluation.feature_extractor")
    parser.add_argument("--heldout-sources", nargs="+", default=["tcga_he_7130", "tia_target"])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "learning.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    config, specs = load_config(REPO / "workflow_config.yaml")
    args.fd_extractor = args.fd_extractor or config["evaluation"]["feature_extractor"]
    sizes = dict(QUICK if args.quick else FULL)
    for name in ("ae_steps", "diffusion_steps", "curve_every", "sampling_steps"):
        sizes[name] = getattr(args, name) or sizes[name]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict = {"what": "does the pipeline learn: first stage, diffusion FD, condition following, 4-band NAIP",
                    "parts": sorted(args.parts), "quick": args.quick, "sizes": sizes, "meaning": MEANING}
    if {1, 2, 3} & set(args.parts):
        result.update(he_parts(args, config, specs, sizes, args.out))
    if 4 in args.parts:
        result["naip"] = naip_part(args, config, sizes, args.out)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["machine"] = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                         "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(summary(result)))


def summary(result: dict) -> dict:
    keys = ("psnr_ae", "psnr_bicubic", "fd_trained", "fd_untrained", "fd_real_floor", "retrieval_top1",
            "retrieval_top5", "cosine_paired", "cosine_shuffled", "seconds")
    short = {k: result[k] for k in keys if k in result}
    if "naip" in result:
        short["naip"] = {k: result["naip"][k] for k in ("psnr_per_band", "psnr_per_band_bicubic", *keys[2:-1])}
    return short


if __name__ == "__main__":
    main()
