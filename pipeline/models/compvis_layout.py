"""The state-dict layout (key -> shape) of a LID checkpoint, derived from its config.

Written from the structure of the CompVis modules, independently of diffusers' converters, so the
loader can name missing, unexpected or mis-shaped keys in the checkpoint's own terms before
conversion, and tests can check full-size configs without any real weights.
"""

from __future__ import annotations

from pipeline.models.lid_config import ConditionSpec, LidConfig, UNetSpec, VQSpec

Shape = tuple[int, ...]
Layout = dict[str, Shape]

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
CONDITION_PREFIX = "cond_stage_model."

# Schedule buffers CompVis DDPM/LatentDiffusion saves; only `betas` is needed (and required).
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)


def _norm(layout: Layout, key: str, channels: int) -> None:
    layout[f"{key}.weight"] = (channels,)
    layout[f"{key}.bias"] = (channels,)


def _conv(layout: Layout, key: str, out: int, inp: int, kernel: int) -> None:
    layout[f"{key}.weight"] = (out, inp, kernel, kernel)
    layout[f"{key}.bias"] = (out,)


def _linear(layout: Layout, key: str, out: int, inp: int, bias: bool = True) -> None:
    layout[f"{key}.weight"] = (out, inp)
    if bias:
        layout[f"{key}.bias"] = (out,)


def _unet_resblock(layout: Layout, key: str, inp: int, out: int, emb: int) -> None:
    _norm(layout, f"{key}.in_layers.0", inp)
    _conv(layout, f"{key}.in_layers.2", out, inp, 3)
    _linear(layout, f"{key}.emb_layers.1", out, emb)
    _norm(layout, f"{key}.out_layers.0", out)
    _conv(layout, f"{key}.out_layers.3", out, out, 3)
    if inp != out:
        _conv(layout, f"{key}.skip_connection", out, inp, 1)


def _spatial_transformer(layout: Layout, key: str, ch: int, spec: UNetSpec) -> None:
    # inner dim = heads * (ch // heads) = ch for LID's legacy head rule.
    _norm(layout, f"{key}.norm", ch)
    _conv(layout, f"{key}.proj_in", ch, ch, 1)
    for depth in range(spec.transformer_depth):
        block = f"{key}.transformer_blocks.{depth}"
        for attn, context in (("attn1", ch), ("attn2", spec.context_dim)):
            _linear(layout, f"{block}.{attn}.to_q", ch, ch, bias=False)
            _linear(layout, f"{block}.{attn}.to_k", ch, context, bias=False)
            _linear(layout, f"{block}.{attn}.to_v", ch, context, bias=False)
            _linear(layout, f"{block}.{attn}.to_out.0", ch, ch)
        _linear(layout, f"{block}.ff.net.0.proj", 8 * ch, ch)  # GEGLU: value and gate, 4x width each
        _linear(layout, f"{block}.ff.net.2", ch, 4 * ch)
        for norm in ("norm1", "norm2", "norm3"):
            _norm(layout, f"{block}.{norm}", ch)
    _conv(layout, f"{key}.proj_out", ch, ch, 1)


def unet_layout(spec: UNetSpec) -> Layout:
    """Keys of CompVis `UNetModel` (without the `model.diffusion_model.` prefix)."""
    layout: Layout = {}
    mc, emb = spec.model_channels, 4 * spec.model_channels
    _linear(layout, "time_embed.0", emb, mc)
    _linear(layout, "time_embed.2", emb, emb)
    _conv(layout, "input_blocks.0.0", mc, spec.in_channels, 3)
    skips, ch, factor, index = [mc], mc, 1, 1
    last = len(spec.channel_mult) - 1
    for level, mult in enumerate(spec.channel_mult):
        for _ in range(spec.num_res_blocks):
            _unet_resblock(layout, f"input_blocks.{index}.0", ch, mc * mult, emb)
            ch = mc * mult
            if factor in spec.attention_resolutions:
                _spatial_transformer(layout, f"input_blocks.{index}.1", ch, spec)
            skips.append(ch)
            index += 1
        if level != last:
            _conv(layout, f"input_blocks.{index}.0.op", ch, ch, 3)
            skips.append(ch)
            index += 1
            factor *= 2
    _unet_resblock(layout, "middle_block.0", ch, ch, emb)
    _spatial_transformer(layout, "middle_block.1", ch, spec)
    _unet_resblock(layout, "middle_block.2", ch, ch, emb)
    index = 0
    for level in reversed(range(len(spec.channel_mult))):
        for i in range(spec.num_res_blocks + 1):
            out = mc * spec.channel_mult[level]
            _unet_resblock(layout, f"output_blocks.{index}.0", ch + skips.pop(), out, emb)
            ch, sub = out, 1
            if factor in spec.attention_resolutions:
                _spatial_transformer(layout, f"output_blocks.{index}.1", ch, spec)
                sub = 2
            if level and i == spec.num_res_blocks:
                _conv(layout, f"output_blocks.{index}.{sub}.conv", ch, ch, 3)
                factor //= 2
            index += 1
    _norm(layout, "out.0", ch)
    _conv(layout, "out.2", spec.out_channels, mc, 3)
    return layout


def _vq_resblock(layout: Layout, key: str, inp: int, out: int) -> None:
    _norm(layout, f"{key}.norm1", inp)
    _conv(layout, f"{key}.conv1", out, inp, 3)
    _norm(layout, f"{key}.norm2", out)
    _conv(layout, f"{key}.conv2", out, out, 3)
    if inp != out:
        _conv(layout, f"{key}.nin_shortcut", out, inp, 1)


def _vq_middle(layout: Layout, key: str, ch: int) -> None:
    _vq_resblock(layout, f"{key}.block_1", ch, ch)
    _norm(layout, f"{key}.attn_1.norm", ch)
    for name in ("q", "k", "v", "proj_out"):
        _conv(layout, f"{key}.attn_1.{name}", ch, ch, 1)
    _vq_resblock(layout, f"{key}.block_2", ch, ch)


def vq_layout(spec: VQSpec) -> Layout:
    """Keys of the CompVis VQ autoencoder (without the `first_stage_model.` prefix)."""
    layout: Layout = {}
    widths = [spec.ch * mult for mult in spec.ch_mult]
    last = len(widths) - 1
    _conv(layout, "encoder.conv_in", spec.ch, spec.in_channels, 3)
    ch = spec.ch
    for level, width in enumerate(widths):
        for block in range(spec.num_res_blocks):
            _vq_resblock(layout, f"encoder.down.{level}.block.{block}", ch, width)
            ch = width
        if level != last:
            _conv(layout, f"encoder.down.{level}.downsample.conv", ch, ch, 3)
    _vq_middle(layout, "encoder.mid", ch)
    _norm(layout, "encoder.norm_out", ch)
    _conv(layout, "encoder.conv_out", spec.z_channels, ch, 3)
    _conv(layout, "decoder.conv_in", ch, spec.z_channels, 3)
    _vq_middle(layout, "decoder.mid", ch)
    for level in reversed(range(len(widths))):
        for block in range(spec.num_res_blocks + 1):
            _vq_resblock(layout, f"decoder.up.{level}.block.{block}", ch, widths[level])
            ch = widths[level]
        if level != 0:
            _conv(layout, f"decoder.up.{level}.upsample.conv", ch, ch, 3)
    _norm(layout, "decoder.norm_out", ch)
    _conv(layout, "decoder.conv_out", spec.out_channels, ch, 3)
    _conv(layout, "quant_conv", spec.embed_dim, spec.z_channels, 1)
    _conv(layout, "post_quant_conv", spec.z_channels, spec.embed_dim, 1)
    layout["quantize.embedding.weight"] = (spec.n_embed, spec.embed_dim)
    return layout


def condition_layout(spec: ConditionSpec) -> Layout:
    layout: Layout = {}
    _linear(layout, "patch_fc", spec.target_dim, spec.patch_embed_dim)
    return layout


def checkpoint_layout(config: LidConfig) -> tuple[Layout, Layout]:
    """(required keys -> shape, optional keys -> shape) of a LID checkpoint's state_dict."""
    required: Layout = {"betas": (config.schedule.timesteps,)}
    for prefix, part in (
        (UNET_PREFIX, unet_layout(config.unet)),
        (FIRST_STAGE_PREFIX, vq_layout(config.vq)),
        (CONDITION_PREFIX, condition_layout(config.condition)),
    ):
        required.update({prefix + key: shape for key, shape in part.items()})
    optional: Layout = {name: (config.schedule.timesteps,) for name in SCHEDULE_BUFFERS if name != "betas"}
    optional["scale_factor"] = ()
    return required, optional
