"""Command line: ``pipeline <command>``; the Snakemake rules call these."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from pipeline.config import DatasetSpec, load_config, schema_default, settings_from_table
from pipeline.errors import PipelineError


def _tile_input(args: argparse.Namespace) -> int:
    from pipeline.tiling.run import tile_one

    spec = DatasetSpec.from_json(args.spec)
    status = tile_one(spec, args.input_id, args.out)
    outcome = "done" if status["status"] == "done" else f"error: {status['reason']}"
    print(f"{spec.name}/{args.input_id}: {outcome}, {status['patch_count']} patches")
    return 0  # a bad input is a recorded outcome, not a failed job


def _tile_summary(args: argparse.Namespace) -> int:
    from pipeline.tiling.outputs import describe_summary, summarize_dataset

    table = summarize_dataset(args.inputs, args.status, args.manifest)
    print(describe_summary(table))
    return 0


def _stain_input(args: argparse.Namespace) -> int:
    from pipeline.stain.normalize import describe, stain_input
    from pipeline.stain.settings import StainSettings

    settings = settings_from_table(StainSettings, _table(args.settings), "stain_normalization")
    print(describe(stain_input(args.tiles, args.out, settings, jpeg_quality=args.jpeg_quality)))
    return 0


def _stain_sheet(args: argparse.Namespace) -> int:
    from pipeline.stain.sheet import before_after_sheet

    pairs = before_after_sheet(args.tiles, args.stain, args.out, args.dataset)
    print(f"{args.out}: {pairs} before | after pairs")
    return 0


def _setup_tiatoolbox(args: argparse.Namespace) -> int:
    from pipeline.stain.environment import environment_python, ensure_environment

    folder = ensure_environment(say=print)  # says something only while it builds
    if not args.quiet:
        print(f"tiatoolbox's environment: {folder} (python: {environment_python(folder)})")
    return 0


def _table(text: str) -> dict:
    """A config table passed as JSON by a rule (or by hand: '{}' means every default)."""
    import json

    table = json.loads(text) if text else {}
    if not isinstance(table, dict):
        raise PipelineError(f"--settings must be a JSON object (a config table), got {text[:80]!r}")
    return table


def _embed_input(args: argparse.Namespace) -> int:
    from pipeline.embedding.encoders import EncoderSettings
    from pipeline.embedding.extract import EmbeddingSettings, embed_input

    settings = settings_from_table(EmbeddingSettings, _table(args.settings), "embedding")
    encoders = [settings_from_table(EncoderSettings, table, f"encoders.{name}").build(name)
                for name, table in _table(args.encoders).items()]
    device = settings.torch_device()
    encoders = [encoder.to(device) for encoder in encoders]
    manifest = embed_input(args.tiles, args.out, encoders, settings)
    print(f"{args.out}: {len(manifest)} patches embedded with {', '.join(e.spec.name for e in encoders)}")
    return 0


def _embed_index(args: argparse.Namespace) -> int:
    from pipeline.embedding.outputs import write_dataset_index

    index = write_dataset_index([Path(p).parent for p in args.inputs], args.out)
    print(f"{args.out}: {len(index)} patches")
    return 0


def _encode_latents(args: argparse.Namespace) -> int:
    from pipeline.latents import EncodeSettings, encode_input

    settings = settings_from_table(EncodeSettings, _table(args.settings), "latents")
    manifest = encode_input(args.embeddings, args.out, settings.autoencoder.load(), settings)
    print(f"{args.out}: {len(manifest)} patches encoded")
    return 0


def _train_autoencoder(args: argparse.Namespace) -> int:
    from pipeline.autoencoder.run import train_autoencoder
    from pipeline.autoencoder.settings import AutoencoderTrainSettings
    from pipeline.io.lightning_run import ProgressLines

    spec = DatasetSpec.from_json(args.spec)
    settings = settings_from_table(AutoencoderTrainSettings, _table(args.settings), "autoencoder",
                                   in_channels=spec.band_count, seed=args.seed)
    every = args.progress_every or max(1, settings.max_steps // 20)
    record = train_autoencoder(args.tiles, args.out, settings, dataset=spec.name, holdout_inputs=spec.holdout_inputs,
                               holdout_fraction=spec.holdout_fraction,
                               callbacks=[ProgressLines(f"autoencoder {spec.name}", settings.max_steps, every)])
    verdict = "beats" if record["beats_bicubic"] else "does NOT beat"
    print(f"{args.out}: {record['kind']} autoencoder, {record['steps']} steps on {record['train_patches']} patches; "
          f"held-out ({record['heldout_patches']} patches) PSNR {record['psnr_ae']:.2f} dB, SSIM {record['ssim_ae']:.3f} "
          f"(untrained {record['psnr_untrained']:.2f} dB; bicubic at the same latent size {record['psnr_bicubic']:.2f} dB, "
          f"SSIM {record['ssim_bicubic']:.3f}: it {verdict} bicubic)")
    return 0


def _train_prior(args: argparse.Namespace) -> int:
    from pipeline.io.lightning_run import ProgressLines
    from pipeline.prior.run import train_prior
    from pipeline.prior.settings import PriorSettings

    spec = DatasetSpec.from_json(args.spec)
    settings = settings_from_table(PriorSettings, _table(args.settings), "prior", embedding_key=spec.encoders[0],
                                   seed=args.seed)
    every = args.progress_every or max(1, settings.max_steps // 20)
    record = train_prior({spec.name: args.embeddings}, args.out, settings,
                         holdout_inputs={spec.name: list(spec.holdout_inputs)},
                         callbacks=[ProgressLines(f"prior {spec.name}", settings.max_steps, every)])
    print(f"{args.out}: grid prior over {record['crop']}x{record['crop']} crops of {record['width']}-d "
          f"{record['embedding_key']} embeddings, {record['steps']} steps on {record['crops']} crops "
          f"(inputs held out: {record['heldout_inputs'][spec.name] or 'none'}); final loss {record['final_loss']:.4g}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pipeline.sampling.generate import GenerateSettings, generate_images

    spec = DatasetSpec.from_json(args.spec)
    settings = settings_from_table(GenerateSettings, _table(args.settings), "generate")
    manifest = generate_images(args.model, args.prior, args.out, dataset=spec.name, kind=spec.kind,
                               mpp=spec.target_mpp, settings=settings, seed=args.seed,
                               source_bands=spec.bands if spec.kind == "aerial" else ())
    for _, row in manifest.iterrows():
        print(f"{args.out}/{row['image']}: {row['width']}x{row['height']} px from a {row['rows']}x{row['cols']} grid "
              f"sampled by the prior ({row['tissue_fraction']:.0%} tissue), {row['unet_evaluations']} UNet evaluations")
    return 0


def training_config(table: dict, embedding_key: str, holdout_fraction: float = 0.0, seed: int | None = None):
    """The run's TrainConfig: the config's `training:` table plus what the dataset and the run imply."""
    from pipeline.embedding.encoders import get_spec
    from pipeline.training.config import TrainConfig

    return settings_from_table(TrainConfig, table, "training", embedding_key=embedding_key,
                               patch_embed_dim=get_spec(embedding_key).output_dim, holdout_fraction=holdout_fraction,
                               seed=schema_default("seed") if seed is None else seed)


def _train(args: argparse.Namespace) -> int:
    from pipeline.embedding.outputs import recorded_encoder
    from pipeline.training.outputs import write_training_done
    from pipeline.training.run import last_checkpoint, train

    from pipeline.io.lightning_run import ProgressLines

    config = training_config(_table(args.settings), args.embedding_key, args.holdout_fraction, args.seed)
    every = args.progress_every or max(1, config.max_steps // 20)
    train(config, [Path(p).parent for p in args.latents], args.run,
          callbacks=[ProgressLines(Path(args.run).name, config.max_steps, every)])
    checkpoint = last_checkpoint(args.run)
    if args.done:  # with what export-model records about the model's conditions
        write_training_done(args.done, checkpoint, config.max_steps,
                            recorded_encoder(args.latents, config.embedding_key))
    print(f"{args.run}: trained to step {config.max_steps}; {checkpoint}")
    return 0


def _export_model(args: argparse.Namespace) -> int:
    from pipeline.models.autoencoder import AutoencoderSettings
    from pipeline.training.export import export_checkpoint
    from pipeline.training.outputs import read_training_done
    from pipeline.training.run import last_checkpoint

    checkpoint = last_checkpoint(args.run)
    if checkpoint is None:
        raise PipelineError(f"{args.run}: no checkpoint to export")
    autoencoder = settings_from_table(AutoencoderSettings, _table(args.autoencoder), "latents.autoencoder")
    done = read_training_done(args.run)
    encoder = done.encoder if done else None
    export_checkpoint(checkpoint, args.out, autoencoder.load(), use_ema=not args.no_ema, encoder=encoder)
    print(f"{args.out}: exported {checkpoint}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from pipeline.sampling.patches import PatchSamplingConfig
    from pipeline.sampling.stage import sample_patches

    spec = DatasetSpec.from_json(args.spec)
    config = settings_from_table(PatchSamplingConfig, _table(args.settings), "sampling", seed=args.seed)
    manifest = sample_patches(args.model, args.embeddings, args.out, dataset=spec.name, mpp=spec.target_mpp,
                              holdout_inputs=spec.holdout_inputs, holdout_fraction=spec.holdout_fraction,
                              config=config)
    print(f"{args.out}: {len(manifest)} patches generated ({config.sampler}, {config.steps} steps, "
          f"guidance {config.guidance_scale:g})")
    return 0


def _large_image(args: argparse.Namespace) -> int:
    from pipeline.sampling.config import LargeImageSettings
    from pipeline.sampling.stage import generate_large_images

    spec = DatasetSpec.from_json(args.spec)
    settings = settings_from_table(LargeImageSettings, _table(args.settings), "large_image")
    _join_process_group()
    manifest = generate_large_images(args.model, args.embeddings, args.out, dataset=spec.name, kind=spec.kind,
                                     mpp=spec.target_mpp, holdout_inputs=spec.holdout_inputs, settings=settings,
                                     seed=args.seed, source_bands=spec.bands if spec.kind == "aerial" else ())
    for row in manifest.itertuples():
        print(f"{args.out}/{row.region}: {row.width}x{row.height} px from {row.input_id} at col {row.col}, "
              f"row {row.row}; {row.unet_evaluations} UNet evaluations, seam score {row.seam_score:.3f}")
    return 0


def _synthesize_slide(args: argparse.Namespace) -> int:
    from pipeline.sampling.slide import SlideSettings, synthesize_slide

    settings = settings_from_table(SlideSettings, _table(args.settings), "synthesize_slide")
    record = synthesize_slide(args.model, args.out, mpp=args.mpp, settings=settings, seed=args.seed,
                              embeddings_dir=args.embeddings, input_id=args.input_id, h5=args.h5,
                              embedding_key=args.embedding_key, dataset=args.dataset,
                              progress_every=args.progress_every)
    print(f"{args.out}: {record['width']}x{record['height']} px at {record['mpp']:g} um/px, "
          f"{len(record['levels'])} levels")
    return 0


def _join_process_group() -> None:
    """Under torchrun (WORLD_SIZE > 1): one process per GPU of the node, in one process group."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluation import EvaluationSettings, describe, evaluate

    result = evaluate(args.out, EvaluationSettings.from_dict(_table(args.settings)), _table(args.encoders),
                      samples=args.samples, large_images=args.large_images, embedding_key=args.embedding_key,
                      prior=args.prior, embeddings=args.embeddings, dataset=args.dataset)
    print(describe(result))
    return 0


def _report_assets(args: argparse.Namespace) -> int:
    from pipeline.reporting.assets import build_assets

    written = build_assets(
        dataset=args.dataset, tiles=args.tiles, slides_table_out=args.slides_table,
        thumbnails_out=args.thumbnails, training=args.training, loss_curve_out=args.loss_curve,
        samples=args.samples, sample_pairs_out=args.sample_pairs, large_images=args.large_images,
        large_image_sheet_out=args.large_image_sheet, metrics=args.metrics,
        metrics_table_out=args.metrics_table, embeddings_index=args.embeddings_index, summary_out=args.summary,
        generated=args.generated, generated_sheet_out=args.generated_sheet)
    print("\n".join(written))
    return 0


def _viewer(args: argparse.Namespace) -> int:
    from pipeline.viewer import ViewerSettings, build_viewer

    settings = settings_from_table(ViewerSettings, _table(args.settings), "viewer")
    index = build_viewer(args.results, args.out, datasets=args.dataset, settings=settings)
    print(f"{index}: open it in a browser (it works from the file system, offline)")
    return 0


def _tile(args: argparse.Namespace) -> int:
    from pipeline.tiling.run import tile_dataset

    config, specs = load_config(args.config)
    unknown = [name for name in args.dataset or () if name not in specs]
    if unknown:
        raise PipelineError(f"{args.config}: no dataset {', '.join(map(repr, unknown))} under `datasets:`; "
                            f"it has {', '.join(specs)}")
    for name in args.dataset or specs:
        print(tile_dataset(specs[name], Path(args.output_dir or config["output_dir"]) / "tiles" / name))
    return 0


def _validate(args: argparse.Namespace) -> int:
    config, specs = load_config(args.config)
    for spec in specs.values():
        unit = "um/px" if spec.kind == "wsi" else "m/px"
        print(f"{spec.name}: {spec.kind}, {len(spec.inputs)} inputs, {spec.target_mpp:g} {unit}")
    return 0


def _encoders(args: argparse.Namespace) -> int:
    from pipeline.embedding.encoders import ENCODERS

    for spec in ENCODERS.values():
        hub = f", hub_id {spec.hub_id}" if spec.hub_id else ""
        print(f"{spec.name}: {spec.output_dim}-d, {spec.input_size} px input, weights {spec.weights_file}{hub}\n"
              f"    {spec.description}")
    return 0


SETTINGS_HELP = "JSON of the config's `{table}:` table ('{{}}': every default, as in the schema)"


def _add_generation_arguments(p: argparse.ArgumentParser, table: str, out_help: str) -> None:
    """What both generating commands take: the model, the dataset's embeddings and spec, settings."""
    p.add_argument("--model", required=True, help="a pipeline export (model_index.json) or a LID release folder")
    p.add_argument("--embeddings", required=True, help="the dataset's embedding folder (index.parquet, inputs/)")
    p.add_argument("--spec", required=True, help="the dataset spec as JSON (DatasetSpec.to_json)")
    p.add_argument("--settings", default="{}", help=SETTINGS_HELP.format(table=table))
    p.add_argument("--seed", type=int, default=schema_default("seed"), help="the config's top-level seed")
    p.add_argument("--out", required=True, help=out_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    config_help = "a workflow config (YAML); relative paths in it are relative to the working directory"

    p = sub.add_parser("validate-config", help="validate a workflow config and list its datasets")
    p.add_argument("config", help=config_help)
    p.set_defaults(func=_validate)

    p = sub.add_parser("encoders", help="list the SSL encoders of the registry (names for `encoders:`)")
    p.set_defaults(func=_encoders)

    p = sub.add_parser("tile-input", help="tile one slide or GeoTIFF of a dataset")
    p.add_argument("--spec", required=True, help="the dataset spec as JSON (DatasetSpec.to_json)")
    p.add_argument("--input-id", required=True, help="which input of the spec")
    p.add_argument("--out", required=True, help="output folder, written atomically")
    p.set_defaults(func=_tile_input)

    p = sub.add_parser("tile-summary", help="gather per-input folders into the dataset status table and index")
    p.add_argument("--status", required=True, help="out: the dataset's status.tsv")
    p.add_argument("--manifest", required=True, help="out: the dataset's manifest.parquet")
    p.add_argument("inputs", nargs="+", help="per-input tiling folders")
    p.set_defaults(func=_tile_summary)

    p = sub.add_parser("stain-input", help="normalise the stain of one tiled input with tiatoolbox (its own env)")
    p.add_argument("--tiles", required=True, help="the input's tiling folder")
    p.add_argument("--out", required=True, help="output folder (shards, manifest.parquet, stain.json), renamed "
                                                "into place when complete")
    p.add_argument("--settings", required=True, help="JSON of the dataset's `stain_normalization:` table")
    p.add_argument("--jpeg-quality", type=int, required=True,
                   help="quality of normalised JPEG patches (the dataset's jpeg_quality)")
    p.set_defaults(func=_stain_input)

    p = sub.add_parser("stain-sheet", help="before | after contact sheet of one stain-normalised input (JPEG)")
    p.add_argument("--tiles", required=True, help="the input's tiling folder")
    p.add_argument("--stain", default="", help="the input's stain folder ('': none, the sheet says so)")
    p.add_argument("--dataset", required=True, help="dataset name, for the title")
    p.add_argument("--out", required=True, help="out: the JPEG")
    p.set_defaults(func=_stain_sheet)

    p = sub.add_parser("setup-tiatoolbox", help="build tiatoolbox's own environment for the stain stage (once; "
                                                "the stain rule does it on first use)")
    p.add_argument("--quiet", action="store_true", help="no line when the environment is ready already")
    p.set_defaults(func=_setup_tiatoolbox)

    p = sub.add_parser("embed-input", help="embed one tiled input with SSL encoders (resumable)")
    p.add_argument("--tiles", required=True, help="the input's tiling folder")
    p.add_argument("--out", required=True, help="output folder (shards, then manifest.parquet)")
    p.add_argument("--encoders", required=True,
                   help='JSON {name: entry of the config\'s `encoders:` table} of the encoders to run')
    p.add_argument("--settings", default="{}", help=SETTINGS_HELP.format(table="embedding"))
    p.set_defaults(func=_embed_input)

    p = sub.add_parser("embed-index", help="gather per-input embedding manifests into the dataset index")
    p.add_argument("--out", required=True, help="out: the dataset's index.parquet")
    p.add_argument("inputs", nargs="+", help="per-input manifest.parquet files")
    p.set_defaults(func=_embed_index)

    p = sub.add_parser("encode-latents", help="encode one embedded input with the first-stage autoencoder")
    p.add_argument("--embeddings", required=True, help="the input's embedding folder")
    p.add_argument("--out", required=True, help="output folder (shards, then manifest.parquet)")
    p.add_argument("--settings", default="{}", help=SETTINGS_HELP.format(table="latents") + ", autoencoder included")
    p.set_defaults(func=_encode_latents)

    p = sub.add_parser("train-autoencoder", help="train (or continue) the first-stage autoencoder on a dataset's patches")
    p.add_argument("--tiles", required=True, help="the dataset's tiling folder OUT/tiles/<dataset>")
    p.add_argument("--spec", required=True, help="the dataset spec as JSON (DatasetSpec.to_json): bands, holdout")
    p.add_argument("--settings", default="{}", help=SETTINGS_HELP.format(table="autoencoder"))
    p.add_argument("--seed", type=int, default=schema_default("seed"), help="the config's top-level seed")
    p.add_argument("--progress-every", type=int, help="steps between progress lines on stdout (default: 1/20 of the run)")
    p.add_argument("--out", required=True, help="OUT/autoencoder/<dataset>: model/, metrics.json (last), checkpoints/")
    p.set_defaults(func=_train_autoencoder)

    p = sub.add_parser("train-prior", help="train (or continue) the embedding-grid prior on a dataset's embeddings")
    p.add_argument("--embeddings", required=True, help="the dataset's embedding folder OUT/embeddings/<dataset>")
    p.add_argument("--spec", required=True, help="the dataset spec as JSON (DatasetSpec.to_json): encoder, holdout")
    p.add_argument("--settings", default="{}", help=SETTINGS_HELP.format(table="prior"))
    p.add_argument("--seed", type=int, default=schema_default("seed"), help="the config's top-level seed")
    p.add_argument("--progress-every", type=int, help="steps between progress lines on stdout (default: 1/20 of the run)")
    p.add_argument("--out", required=True, help="OUT/prior/<dataset>: model/, prior.json (last), checkpoints/")
    p.set_defaults(func=_train_prior)

    p = sub.add_parser("train", help="train (or continue) a latent diffusion model on latent shards")
    p.add_argument("--run", required=True, help="run folder: checkpoints/, logs; a re-run continues from last.ckpt")
    p.add_argument("--embedding-key", required=True, help="the encoder whose embeddings condition the model")
    p.add_argument("--holdout-fraction", type=float, default=0.0,
                   help="the dataset's holdout.fraction: patch keys never trained on")
    p.add_argument("--seed", type=int, default=schema_default("seed"), help="the config's top-level seed")
    p.add_argument("--settings", default="{}", help=SETTINGS_HELP.format(table="training"))
    p.add_argument("--done", help="file written when training reached max_steps")
    p.add_argument("--progress-every", type=int, help="steps between progress lines on stdout (default: 1/20 of the run)")
    p.add_argument("latents", nargs="+", help="per-input latent manifest.parquet files")
    p.set_defaults(func=_train)

    p = sub.add_parser("export-model", help="export a run's last checkpoint as a diffusers pipeline folder")
    p.add_argument("--run", required=True, help="the training run folder")
    p.add_argument("--autoencoder", required=True, help="JSON of the config's `latents.autoencoder:` table")
    p.add_argument("--out", required=True, help="the pipeline folder, written atomically")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights even if an EMA exists")
    p.set_defaults(func=_export_model)

    p = sub.add_parser("sample", help="generate one patch per held-out real patch from its embedding")
    _add_generation_arguments(p, "sampling", "output folder, written atomically")
    p.set_defaults(func=_sample)

    p = sub.add_parser("large-image", help="generate large images from k x k regions of real embeddings")
    _add_generation_arguments(p, "large_image", "output folder: region-NNN/ (each atomic), then manifest.parquet")
    p.set_defaults(func=_large_image)

    p = sub.add_parser("generate", help="reference-free large images: grids sampled by the prior, then rendered")
    p.add_argument("--model", required=True, help="a pipeline export (model_index.json) or a LID release folder")
    p.add_argument("--prior", required=True, help="the prior stage's folder OUT/prior/<dataset> (prior.json, model/)")
    p.add_argument("--spec", required=True, help="the dataset spec as JSON (DatasetSpec.to_json)")
    p.add_argument("--settings", default="{}", help=SETTINGS_HELP.format(table="generate"))
    p.add_argument("--seed", type=int, default=schema_default("seed"), help="the config's top-level seed")
    p.add_argument("--out", required=True, help="output folder: image-NNN/ (each atomic), then manifest.parquet")
    p.set_defaults(func=_generate)

    p = sub.add_parser("synthesize-slide", help="a whole synthetic slide from a slide's embedding grid (resumable)")
    p.add_argument("--model", required=True, help="a pipeline export (model_index.json) or a LID release folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--embeddings", help="an embedding-stage folder (index.parquet, inputs/); needs --input-id")
    source.add_argument("--h5", help="a TRIDENT/CLAM feature file (datasets coords and features)")
    p.add_argument("--input-id", help="with --embeddings: the slide (input id) whose grid to render")
    p.add_argument("--embedding-key", help="with --embeddings: the encoder, where the model does not record it")
    p.add_argument("--mpp", type=float, required=True, help="micrometres per pixel of the output (the grid's patches)")
    p.add_argument("--dataset", help="dataset name, recorded in slide.json")
    p.add_argument("--settings", default="{}", help=SETTINGS_HELP.format(table="synthesize_slide"))
    p.add_argument("--seed", type=int, default=schema_default("seed"), help="the config's top-level seed")
    p.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines on stderr")
    p.add_argument("--out", required=True,
                   help="output folder (slide.tif, thumbnail.jpg, slide.json), written atomically; "
                        "bands in progress are kept in .<name>.work/ beside it")
    p.set_defaults(func=_synthesize_slide)

    p = sub.add_parser("evaluate", help="FID/KID and embedding similarity of generated patches and large images")
    p.add_argument("--samples", help="patch samples folder, OUT/samples/<dataset>")
    p.add_argument("--large-images", help="large-image folder, OUT/large_images/<dataset>")
    p.add_argument("--settings", default="{}", help=SETTINGS_HELP.format(table="evaluation"))
    p.add_argument("--encoders", default="{}", help="JSON of the config's `encoders:` table")
    p.add_argument("--embedding-key", help="encoder that made the conditions, where the folders do not record it")
    p.add_argument("--prior", help="embedding-grid prior folder, OUT/prior/<dataset> (needs --embeddings, --dataset)")
    p.add_argument("--embeddings", help="the dataset's embeddings folder OUT/embeddings/<dataset>: the prior's real grids")
    p.add_argument("--dataset", help="the dataset whose label the prior samples with")
    p.add_argument("--out", required=True, help="the metrics.json file, written atomically")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("report-assets", help="tables, image sheets and charts for the Snakemake report")
    p.add_argument("--dataset", required=True, help="dataset name, for titles")
    p.add_argument("--tiles", help="tiling folder OUT/tiles/<dataset> (status.tsv, inputs/*/thumbnail.jpg)")
    p.add_argument("--training", help="training run folder OUT/training/<dataset> (logs/version_*/metrics.csv)")
    p.add_argument("--samples", help="patch samples folder OUT/samples/<dataset>")
    p.add_argument("--large-images", help="large-image folder OUT/large_images/<dataset>")
    p.add_argument("--metrics", help="OUT/evaluation/<dataset>/metrics.json")
    p.add_argument("--embeddings-index", help="OUT/embeddings/<dataset>/index.parquet (random-encoder check)")
    p.add_argument("--slides-table", help="out: HTML table of inputs, patch counts and failures (needs --tiles)")
    p.add_argument("--thumbnails", help="out: JPEG sheet of the tissue-mask thumbnails (needs --tiles)")
    p.add_argument("--loss-curve", help="out: SVG of the training loss (needs --training)")
    p.add_argument("--sample-pairs", help="out: JPEG of real | generated patch pairs (needs --samples)")
    p.add_argument("--large-image-sheet", help="out: JPEG of reference | generated regions (needs --large-images)")
    p.add_argument("--metrics-table", help="out: HTML table of the metrics (needs --metrics)")
    p.add_argument("--generated", help="reference-free images folder OUT/generated/<dataset>")
    p.add_argument("--generated-sheet", help="out: JPEG of the reference-free images and their masks (needs --generated)")
    p.add_argument("--summary", help="out: HTML overview of whichever inputs are given")
    p.set_defaults(func=_report_assets)

    p = sub.add_parser("viewer", help="deep-zoom viewer of the large images: a static site, RESULTS_DIR/viewer/index.html")
    p.add_argument("results", help="the results folder (the config's output_dir): reads large_images/ and embeddings/")
    p.add_argument("--out", help="the site's folder, written as a whole (default: RESULTS_DIR/viewer)")
    p.add_argument("--dataset", action="append",
                   help="a dataset to show (repeat for several; default: every dataset with large images)")
    p.add_argument("--settings", default="{}", help=SETTINGS_HELP.format(table="viewer"))
    p.set_defaults(func=_viewer)

    p = sub.add_parser("tile", help="tile datasets without Snakemake (sequential)")
    p.add_argument("config", help=config_help)
    p.add_argument("--dataset", action="append",
                   help="a dataset of the config to tile (repeat for several; default: all of them)")
    p.add_argument("--output-dir", help="default: the config's output_dir")
    p.set_defaults(func=_tile)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line (Python's default format repeats the source line that raised it)."""
    return f"{category.__name__}: {message} ({filename}:{lineno})\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    warnings.formatwarning = _one_line_warning
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        if not is_input_error(exc) or os.environ.get("PIPELINE_TRACEBACK"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def is_input_error(exc: BaseException) -> bool:
    """The package's typed errors and missing files: their messages name the file and the reason,
    so a traceback would only hide them (set PIPELINE_TRACEBACK=1 to get one anyway)."""
    return isinstance(exc, (PipelineError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
