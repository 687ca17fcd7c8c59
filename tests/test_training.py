"""Training stage: the small preset on latents of real H&E patches, on the CPU.

Latent shards are made here from the real 256x256 crops (../shared/data/he_patches_256): embedding
shards as the embedding stage writes them (embeddings: a fixed random projection of the image),
then the latent stage with the small random-weight f16 VQ preset (3x16x16 latents, so that a
diffusion model trains on a CPU in seconds). Torch runs single-threaded here: on a small machine
shared with other jobs, two OpenMP threads spin against each other and run many times slower.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from pipeline.io.shards import decode_npy, encode_npy, read_shard, write_shard
from pipeline.latents import EncodeSettings, encode_input
from pipeline.models.autoencoder import random_vq
from pipeline.models import load_lid_release
from pipeline.models import load_pipeline
from pipeline.training import TrainConfig, train
from pipeline.training.data import (
    EmbeddingWidthError, LatentBatches, LatentDataModule, ShardInfo, find_latent_shards, shards_for_rank,
    step_randomness,
)
from pipeline.training.environment import LaunchConfigError, choose_cluster_environment, cluster_plugins
from pipeline.training.export import export_checkpoint, export_module
from pipeline.training.module import LatentDiffusion, null_condition_input, warmup_factor
from pipeline.training.run import LossHistory, build_module, last_checkpoint
from test_latents import make_embedding_input, real_patches

LID_FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "seed_ldm_tiny"
STEPS = 120
CONFIG = TrainConfig(
    preset="small", latent_size=16, batch_size=8, learning_rate=1e-3, warmup_steps=10, max_steps=STEPS,
    ema_decay=0.99, num_workers=0, shards_per_block=2, checkpoint_every=20, log_every=10, seed=7,
)
QUIET = {"enable_progress_bar": False}

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.fixture(scope="module")
def autoencoder():
    return random_vq("tiny-vq-f16", seed=0, allow_random_weights=True)


@pytest.fixture(scope="module")
def latent_root(tmp_path_factory, autoencoder) -> Path:
    """Two inputs (4 + 2 shards) of latents of all 22 real patches."""
    root = tmp_path_factory.mktemp("data")
    patches = real_patches()
    settings = EncodeSettings(batch_size=8, num_workers=0, device="cpu", flips="all")
    for input_id, part in (("slideA", patches[:14]), ("slideB", patches[14:])):
        make_embedding_input(root / "embeddings" / "inputs" / input_id, part, per_shard=4)
        encode_input(root / "embeddings" / "inputs" / input_id, root / "latents" / "inputs" / input_id,
                     autoencoder, settings)
    return root / "latents"


@pytest.fixture(scope="module")
def run_a(latent_root, tmp_path_factory):
    """The uninterrupted reference run."""
    run_dir = tmp_path_factory.mktemp("run_a")
    history = LossHistory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, module = train(CONFIG, [latent_root], run_dir, callbacks=[history], **QUIET)
    return run_dir, history, module


def test_small_preset_loss_falls(run_a):
    _, history, module = run_a
    losses = np.array(history.losses)
    assert history.steps == list(range(STEPS)) and np.isfinite(losses).all()
    first, last = losses[:20].mean(), losses[-20:].mean()
    assert last < 0.6 * first, (first, last)
    assert module.unet.config.block_out_channels == (32, 64)


class Crash(Callback):
    """Kills the run (an exception, as a node failure would) when batch ``step`` starts."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if int(batch["step"]) == self.step:
            raise RuntimeError("node lost")


def assert_same_state(ours_path: Path, theirs_path: Path) -> None:
    """Weights, EMA (copies and update count) and optimizer moments at the same step agree."""
    ours, theirs = (torch.load(p, weights_only=False) for p in (ours_path, theirs_path))
    assert ours["global_step"] == theirs["global_step"]
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    assert any(key.startswith("ema.") for key in ours["state_dict"])
    for key, value in ours["state_dict"].items():
        assert torch.allclose(value, theirs["state_dict"][key], rtol=0, atol=1e-6), key
    for a, b in zip(ours["optimizer_states"][0]["state"].values(), theirs["optimizer_states"][0]["state"].values()):
        assert torch.allclose(a["exp_avg"], b["exp_avg"], rtol=0, atol=1e-6)
        assert torch.allclose(a["exp_avg_sq"], b["exp_avg_sq"], rtol=0, atol=1e-9)


def test_resumed_run_repeats_the_uninterrupted_losses(run_a, latent_root, tmp_path):
    run_dir_a, history_a, _ = run_a
    reference = np.array(history_a.losses)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # 1. stopped cleanly at step 10, then continued to step 20
        stopped, resumed = LossHistory(), LossHistory()
        for steps, history in ((10, stopped), (20, resumed)):
            train(dataclasses.replace(CONFIG, max_steps=steps), [latent_root], tmp_path / "clean", callbacks=[history],
                  **QUIET)
        assert stopped.steps == list(range(10)) and resumed.steps == list(range(10, 20))
        assert np.abs(np.array(stopped.losses) - reference[:10]).max() <= 1e-6
        assert np.abs(np.array(resumed.losses) - reference[10:20]).max() <= 1e-6
        assert_same_state(tmp_path / "clean" / "checkpoints" / "last.ckpt",
                          run_dir_a / "checkpoints" / "step-000020.ckpt")
        # 2. killed at step 15; the newest checkpoint is the periodic one of step 10
        crashed, recovered = LossHistory(), LossHistory()
        every_10 = dataclasses.replace(CONFIG, checkpoint_every=10, max_steps=20)
        with pytest.raises(RuntimeError, match="node lost"):
            train(every_10, [latent_root], tmp_path / "crash", callbacks=[crashed, Crash(15)], **QUIET)
        assert torch.load(last_checkpoint(tmp_path / "crash"), weights_only=False)["global_step"] == 10
        train(every_10, [latent_root], tmp_path / "crash", callbacks=[recovered], **QUIET)
    assert crashed.steps == list(range(15)) and recovered.steps == list(range(10, 20))
    assert np.abs(np.array(crashed.losses) - reference[:15]).max() <= 1e-6
    assert np.abs(np.array(recovered.losses) - reference[10:20]).max() <= 1e-6
    assert_same_state(tmp_path / "crash" / "checkpoints" / "last.ckpt", run_dir_a / "checkpoints" / "step-000020.ckpt")


def test_data_stream_resumes_at_any_step(latent_root):
    shards = find_latent_shards([latent_root])
    config = CONFIG
    fresh = iter(LatentBatches(shards, config, rank=0, world_size=1, start_step=0))
    batches = [next(fresh) for _ in range(9)]  # 72 samples: crosses several 2-shard blocks (<= 8 samples)
    for start in (1, 4, 7):
        resumed = next(iter(LatentBatches(shards, config, rank=0, world_size=1, start_step=start)))
        for name in ("latents", "embeddings", "noise", "timesteps", "drop"):
            assert torch.equal(resumed[name], batches[start][name]), (start, name)
    # every stored flip variant is used, so the augmentation reaches training
    assert batches[0]["latents"].shape == (8, 3, 16, 16)


def test_shards_split_by_rank_and_fewer_shards_than_ranks():
    shards = [ShardInfo(f"s{i}.tar", 5 + i) for i in range(5)]
    parts = [shards_for_rank(shards, rank, 2) for rank in range(2)]
    assert sorted(s.path for p in parts for s in p) == sorted(s.path for s in shards)
    assert not {s.path for s in parts[0]} & {s.path for s in parts[1]}
    with pytest.warns(UserWarning, match="every rank samples from all shards"):
        assert shards_for_rank(shards[:2], 3, 4) == shards[:2]


def test_fewer_shards_than_ranks_still_gives_every_rank_different_data(latent_root):
    one = find_latent_shards([latent_root])[:1]
    with pytest.warns(UserWarning):
        streams = [iter(LatentBatches(one, CONFIG, rank=rank, world_size=2)) for rank in range(2)]
    first = [next(s) for s in streams]
    assert not torch.equal(first[0]["noise"], first[1]["noise"])
    assert first[0]["latents"].shape == first[1]["latents"].shape


def test_cfg_dropout_rate_and_null_condition(latent_root):
    drops = torch.cat([step_randomness(7, 0, step, 8, (3, 16, 16), 1000, 0.1)["drop"] for step in range(2500)])
    rate = drops.float().mean().item()
    assert abs(rate - 0.1) < 4 * math.sqrt(0.09 / len(drops)), rate  # 20000 draws: +-0.0085
    module = LatentDiffusion(CONFIG)
    embeddings = torch.randn(6, CONFIG.patch_embed_dim)
    drop = torch.tensor([True, False, True, False, False, True])
    zeroed = null_condition_input(embeddings, drop)
    assert (zeroed[drop] == 0).all() and torch.equal(zeroed[~drop], embeddings[~drop])
    with torch.no_grad():
        context = module.context(embeddings, drop)
    bias = module.condition.patch_fc.bias
    assert torch.isfinite(context).all() and context.shape == (6, 1, 64)
    assert torch.allclose(context[drop, 0], bias.expand(3, -1), rtol=0, atol=0)  # L2-normalised zero stays zero
    assert not torch.allclose(context[~drop, 0], bias.expand(3, -1))


def test_warmup_is_linear_then_constant():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_export_loads_back_with_the_same_outputs(run_a, autoencoder, tmp_path):
    run_dir, _, module = run_a
    folder = export_module(module, tmp_path / "export", autoencoder)
    loaded = load_pipeline(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["condition", "model_index.json", "scheduler", "unet", "vae"]
    training = loaded.provenance["training"]
    assert training["ema"] is True and training["global_step"] == STEPS
    assert loaded.provenance["autoencoder"]["random_weights"] is True and loaded.random_parts == ["autoencoder"]
    ema_unet, ema_condition = module.export_models()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=generator)
    embeddings = torch.randn(2, CONFIG.patch_embed_dim, generator=generator)
    t = torch.tensor([999, 10])
    with torch.no_grad():
        expected = ema_unet(x, t, encoder_hidden_states=ema_condition(embeddings)).sample
        got = loaded.unet(x, t, encoder_hidden_states=loaded.context(embeddings)).sample
        assert torch.allclose(got, expected, rtol=0, atol=1e-6)
        assert torch.allclose(loaded.condition.null_context(2)[:, 0], ema_condition.patch_fc.bias.expand(2, -1))
        assert torch.allclose(loaded.decode_latents(x), autoencoder.decode(x), atol=1e-6)
    assert torch.allclose(loaded.scheduler.betas, module.noise_scheduler.betas)
    assert loaded.scheduler.config.prediction_type == "epsilon"
    # Exporting from the final checkpoint file gives the same model.
    again = load_pipeline(export_checkpoint(last_checkpoint(run_dir), tmp_path / "export2", autoencoder))
    with torch.no_grad():
        assert torch.allclose(again.unet(x, t, encoder_hidden_states=again.context(embeddings)).sample, expected,
                              rtol=0, atol=1e-6)
    assert again.provenance["training"]["global_step"] == STEPS


def test_embedding_width_mismatch_names_shard_and_widths(latent_root, tmp_path):
    source = sorted((latent_root / "inputs" / "slideA").glob("patches-*.tar"))[0]
    samples = read_shard(source)
    wide = [{**s, "hipt_vit_s16.npy": encode_npy(np.ones(768, np.float16))} for s in samples]
    bad = tmp_path / "inputs" / "wide" / "patches-000000.tar"
    write_shard(bad, wide)
    data = LatentDataModule([tmp_path], CONFIG)
    with pytest.raises(EmbeddingWidthError) as error:
        data.setup("fit")
    message = str(error.value)
    assert str(bad) in message and "768" in message and "384" in message
    # the stream checks every sample too (e.g. a later shard of a folder whose first shard is fine)
    with pytest.raises(EmbeddingWidthError, match="768-d.*384-d"):
        next(iter(LatentBatches([ShardInfo(str(bad), len(wide))], CONFIG)))


@pytest.mark.parametrize("env, devices, nodes, expected", [
    ({}, 1, 1, "lightning"),
    ({}, 4, 1, "lightning"),
    # Snakemake's SLURM executor: one task, 4 GPUs -> Lightning must start the processes itself
    ({"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "rule_train"},
     4, 1, "lightning"),
    ({"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "rule_train"}, 1, 1, "slurm"),
    # srun with one task per GPU -> SLURM sets the ranks
    ({"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "t"}, 4, 2, "slurm"),
    ({"SLURM_NTASKS": "4", "SLURM_JOB_NAME": "interactive"}, 4, 1, "lightning"),
    ({"RANK": "0", "GROUP_RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4", "SLURM_NTASKS": "1"}, 4, 1, "auto"),
])
def test_cluster_environment_decision(env, devices, nodes, expected):
    decision = choose_cluster_environment(env, devices, nodes)
    assert decision.environment == expected, decision.reason
    plugins = cluster_plugins(decision)
    names = [type(p).__name__ for p in plugins]
    assert names == {"lightning": ["LightningEnvironment"], "slurm": ["SLURMEnvironment"], "auto": []}[expected]


@pytest.mark.parametrize("env, devices, nodes, match", [
    ({"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NAME": "t"}, 4, 1, "2 tasks"),
    ({"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "t"}, 4, 2, "multi-node"),
])
def test_cluster_environment_inconsistent_layout_fails(env, devices, nodes, match):
    with pytest.raises(LaunchConfigError, match=match):
        choose_cluster_environment(env, devices, nodes)


def test_init_from_converted_lid_release():
    if not (LID_FIXTURE / "checkpoints" / "last.ckpt").is_file():
        pytest.fail(f"LID fixture missing: {LID_FIXTURE}")
    config = TrainConfig(preset="lid", init_from=str(LID_FIXTURE), patch_embed_dim=384, num_workers=0)
    module = build_module(config)
    release = load_lid_release(LID_FIXTURE)
    for ours, theirs in ((module.unet, release.unet), (module.condition, release.condition)):
        state = theirs.state_dict()
        assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())
        assert all(p.requires_grad for p in ours.parameters())
    with pytest.raises(ValueError, match="768-d embeddings.*384|384-d embeddings"):
        build_module(TrainConfig(preset="lid", init_from=str(LID_FIXTURE), patch_embed_dim=768))


def test_continuing_with_other_settings_is_refused(run_a, latent_root):
    run_dir, _, _ = run_a
    with pytest.raises(ValueError, match="learning_rate"):
        train(dataclasses.replace(CONFIG, learning_rate=5e-4, max_steps=STEPS + 1), [latent_root], run_dir, **QUIET)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(latent_root):
    batch = next(iter(LatentBatches(find_latent_shards([latent_root]), dataclasses.replace(CONFIG, batch_size=2))))
    results = []
    for checkpointing in (False, True):
        module = LatentDiffusion(dataclasses.replace(CONFIG, gradient_checkpointing=checkpointing)).train()
        loss = module.diffusion_loss(batch)
        loss.backward()
        results.append((loss.detach(), module.unet.conv_in.weight.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], rtol=0, atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)


def test_held_out_patches_never_reach_training(latent_root):
    from pipeline.splits import is_held_out

    config = dataclasses.replace(CONFIG, holdout_fraction=0.3)
    samples = [s for shard in sorted(latent_root.rglob("patches-*.tar")) for s in read_shard(shard)]
    held = {s["__key__"] for s in samples if is_held_out(s["__key__"], 0.3)}
    assert 0 < len(held) < len(samples)  # the fraction splits the 22 real patches
    shards = find_latent_shards([latent_root], config.holdout_fraction)
    assert sum(s.count for s in shards) == len(samples) - len(held)
    embedding_of = {s["__key__"]: decode_npy(s["hipt_vit_s16.npy"]).astype(np.float32) for s in samples}
    stream = iter(LatentBatches(shards, config, rank=0, world_size=1, start_step=0))
    seen = set()
    for _ in range(12):  # 96 samples: every training patch several times
        for embedding in next(stream)["embeddings"].numpy():
            matches = [k for k, e in embedding_of.items() if np.array_equal(e, embedding)]
            assert len(matches) == 1
            seen.add(matches[0])
    assert seen == set(embedding_of) - held
