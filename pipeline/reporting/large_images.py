"""The large images in the report: each generated image next to the real region whose
embeddings it was generated from (large_images.jpg), from
`pipeline.sampling.outputs.read_large_images`."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from pipeline.io.images import read_image
from pipeline.reporting.notices import model_parts
from pipeline.io.sheets import BLUE, font, write_jpeg
from pipeline.reporting.sheets import GREY, Caption, random_lines, stack, title_bar
from pipeline.sampling.outputs import GeneratedRegion, read_large_images


def _region_row(region: GeneratedRegion, max_side: int) -> Image.Image:
    reference, generated = (Image.fromarray(read_image(path, max_side)) for path in (region.reference, region.generated))
    row = Image.new("RGB", (reference.width + generated.width + 30, max(reference.height, generated.height) + 48),
                    (255, 255, 255))
    draw = ImageDraw.Draw(row)
    typeface = font(14)
    settings = region.settings
    details = (f"{region.name}: {region.k}x{region.k} patches of input {region.input_id} from col {region.col}, "
               f"row {region.row}; {settings.get('width')}x{settings.get('height')} px")
    if settings.get("seam_score") is not None:
        details += f"; seam score {settings['seam_score']:.3f}"
    draw.text((10, 4), details, fill=(20, 20, 20), font=typeface)
    draw.text((10, 24), "real reference", fill=(20, 20, 20), font=typeface)
    draw.text((reference.width + 20, 24), "generated", fill=BLUE, font=typeface)
    row.paste(reference, (10, 46))
    row.paste(generated, (reference.width + 20, 46))
    return row


def large_image_sheet(large_images_dir: str | Path, out: str | Path, dataset: str, max_side: int = 768,
                      max_regions: int = 8) -> int:
    """JPEG sheet: per region, the real reference region (left) next to the large image generated
    from its grid of embeddings (right), each downscaled to at most max_side."""
    large = read_large_images(large_images_dir)
    shown = large.regions[:max_regions]
    rows = [_region_row(region, max_side) for region in shown]
    first = shown[0].settings
    mpp = "?" if large.mpp is None else large.mpp
    lines = [Caption(f"{dataset}: {len(shown)} of {len(large.regions)} large images, each next to the real region "
                     f"whose embeddings it was generated from"),
             Caption(f"mode {first.get('mode', '?')}, sampler {first.get('sampler', '?')}, {first.get('steps', '?')} "
                     f"steps, guidance {first.get('guidance_scale', '?')}; pixel size {mpp}; shown "
                     f"downscaled to at most {max_side} px", GREY)]
    lines += random_lines(model_parts(large.random_parts))
    write_jpeg(stack([title_bar(max(r.width for r in rows), lines), *rows]), out)
    return len(shown)
