"""The UNet as the large-image sampler calls it: a chunk of windows at a time, in the configured
precision, optionally reusing its deep features between full evaluations (DeepCache, Ma et al.
2024: adjacent denoising steps change a UNet's deep features little, so every `reuse_every`-th
step runs the whole UNet and the steps in between run only its outermost `reuse_depth` down and
up blocks on the cached input of those up blocks).

Only the plain text-conditioned configuration of diffusers' `UNet2DConditionModel` that the
pipeline builds is supported by the partial forward (no class, added or image-hint embeddings,
no attention masks, no ControlNet residuals); its full pass is diffusers' own forward, checked
equal to it.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from pipeline.io.precision import autocast


class WindowDenoiser:
    """Noise predictions for batches of windows; `begin_step` says whether a step is a full one."""

    def __init__(self, unet: UNet2DConditionModel, precision: str = "float32", reuse_every: int = 1,
                 reuse_depth: int = 1, compile_unet: bool = False, channels_last: bool = False) -> None:
        if reuse_every < 1 or reuse_depth < 1:
            raise ValueError("reuse_every and reuse_depth must be at least 1")
        self.unet = unet
        self.precision = precision
        self.reuse_every = reuse_every
        self.reuse_depth = reuse_depth
        weight = next(unet.parameters(), None)
        self.device = weight.device if weight is not None else torch.device("cpu")
        if reuse_every > 1:
            blocks = len(unet.down_blocks)
            if reuse_depth >= blocks:
                raise ValueError(f"reuse_depth {reuse_depth} leaves nothing to reuse in a UNet of {blocks} blocks")
        # NHWC: cuDNN's tensor-core convolutions want it; the weights are converted in place
        # (the same numbers in another layout), the windows on every call.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            unet.to(memory_format=torch.channels_last)
        self.forward = torch.compile(unet) if compile_unet else unet
        self.cache: dict[int, torch.Tensor] = {}
        self.full_step = True

    def begin_step(self, step: int) -> None:
        """Step number `step` of a trajectory (0 first): full every reuse_every-th step."""
        self.full_step = step % self.reuse_every == 0
        if step == 0:
            self.cache.clear()

    def __call__(self, samples: torch.Tensor, timesteps: torch.Tensor, contexts: torch.Tensor,
                 key: int = 0) -> torch.Tensor:
        """Float32 noise predictions; `key` names the chunk whose deep features are cached."""
        samples = samples.contiguous(memory_format=self.memory_format)
        with torch.no_grad(), autocast(self.precision, self.device):
            if self.reuse_every == 1:
                epsilon = self.forward(samples, timesteps, encoder_hidden_states=contexts).sample
            else:
                epsilon = self._reusing_forward(samples, timesteps, contexts, key)
        return epsilon.float()

    def _reusing_forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                         key: int) -> torch.Tensor:
        unet, depth = self.unet, self.reuse_depth
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        context = unet.process_encoder_hidden_states(encoder_hidden_states=context, added_cond_kwargs=None)
        hidden = unet.conv_in(sample)
        skips: tuple[torch.Tensor, ...] = (hidden,)
        outer = len(unet.up_blocks) - depth  # up blocks from here on run every step
        down_blocks = unet.down_blocks if self.full_step else unet.down_blocks[:depth]
        for block in down_blocks:
            if getattr(block, "has_cross_attention", False):
                hidden, produced = block(hidden_states=hidden, temb=emb, encoder_hidden_states=context)
            else:
                hidden, produced = block(hidden_states=hidden, temb=emb)
            skips += produced
        if self.full_step:
            hidden = unet.mid_block(hidden, emb, encoder_hidden_states=context) \
                if getattr(unet.mid_block, "has_cross_attention", False) else unet.mid_block(hidden, emb)
            first = 0
        else:
            if key not in self.cache:
                raise RuntimeError("a reusing step before any full step of this chunk")
            hidden, first = self.cache[key], outer
            # The outer up blocks take the skips of the outer down blocks: the first ones produced
            # (the last one, the outermost downsampler's output, belongs to a deeper up block).
            taken = sum(len(block.resnets) for block in unet.up_blocks[outer:])
            skips = skips[:taken]
        # As diffusers: an explicit upsample size only where the sample does not halve evenly.
        odd = any(side % 2**unet.num_upsamplers for side in sample.shape[-2:])
        for index, block in enumerate(unet.up_blocks[first:], start=first):
            if index == outer and self.full_step:
                self.cache[key] = hidden
            res = skips[-len(block.resnets):]
            skips = skips[: -len(block.resnets)]
            upsample_size = skips[-1].shape[2:] if odd and index < len(unet.up_blocks) - 1 else None
            if getattr(block, "has_cross_attention", False):
                hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res,
                               encoder_hidden_states=context, upsample_size=upsample_size)
            else:
                hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)
