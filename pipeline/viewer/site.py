"""The viewer site: ``OUT/viewer/`` (written as a whole, atomically).

| path | content |
|---|---|
| ``index.html`` | every large image, by dataset: thumbnail (reference, generated), size, µm/px, seam score |
| ``<dataset>/<region>/index.html`` | generated and reference in synchronised viewers, scale bars, provenance |
| ``<dataset>/<region>/{generated,reference}.dzi`` and ``…_files/`` | the Deep Zoom pyramids |
| ``<dataset>/<region>/thumbnail.jpg`` | the index's image |
| ``lib/openseadragon/`` | OpenSeadragon (from npm), its button images and licence |
| ``lib/viewer.js``, ``lib/viewer.css`` | the pages' own code (pipeline/viewer/static/) |
"""

from __future__ import annotations

import html
import json
import os
import shutil
from pathlib import Path
from string import Template
from typing import Any

from PIL import Image

from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_dir
from pipeline.io.large_image_files import UM_PER_M
from pipeline.viewer.dzi import DeepZoomImage, thumbnail, write_dzi
from pipeline.viewer.library import copy_library, openseadragon_build
from pipeline.viewer.regions import Region, read_regions
from pipeline.viewer.settings import ViewerSettings

HERE = Path(__file__).parent
LABELS = {"generated": "Generated", "reference": "Reference (real region)"}


def template(name: str) -> Template:
    return Template((HERE / "templates" / name).read_text())


def pixel_size_text(pixel_size_um: float, aerial: bool) -> str:
    return f"{pixel_size_um / UM_PER_M:g} m/px" if aerial else f"{pixel_size_um:g} µm/px"


def extent_text(pixels: int, pixel_size_um: float, aerial: bool) -> str:
    return f"{pixels * pixel_size_um / UM_PER_M:,.4g} m" if aerial else f"{pixels * pixel_size_um:,.4g} µm"


def random_banner(records: list[dict[str, Any]]) -> str:
    parts = sorted({part for record in records if record.get("random_weights")
                    for part in record.get("random_parts") or ["model"]})
    if not parts:
        return ""
    return (f'<p class="banner">Random weights ({html.escape(", ".join(parts))}): the generated images are '
            "noise, not tissue; they only show that the pipeline runs.</p>")


def provenance(region: Region, generated: DeepZoomImage, pixel_size_um: float) -> list[tuple[str, str]]:
    """(label, text) rows: where the region is, what made the image, how it scored."""
    record = region.record

    def get(key: str) -> Any:
        return record.get(key, "?")  # an older region.json may lack a field
    if region.x is None:
        where = "not in the embedding index"
    else:
        unit = "source" if region.aerial else "level-0"
        coordinate = (lambda v: f"{v:g}") if region.aerial else (lambda v: f"{int(v)}")
        where = f"x {coordinate(region.x)}, y {coordinate(region.y)} ({unit} px of the top-left patch)"
    settings = ", ".join(f"{name} {record[key]:g}" for name, key in
                         (("steps", "steps"), ("stride", "stride"), ("guidance", "guidance_scale"))
                         if isinstance(record.get(key), (int, float)))
    random = f" (random: {', '.join(record.get('random_parts') or ['model'])})" if record.get("random_weights") else ""
    seam = record.get("seam_score")
    evaluations = record.get("unet_evaluations")
    return [
        ("dataset", region.dataset),
        ("slide", f"{region.slide or get('input_id')}" + (f" ({region.crs})" if region.crs else "")),
        ("position", f"{where}; grid col {get('col')}, row {get('row')}"),
        ("size", f"{generated.width} × {generated.height} px, "
                 f"{extent_text(generated.width, pixel_size_um, region.aerial)} a side, {get('k')} × {get('k')} patches"),
        ("pixel size", pixel_size_text(pixel_size_um, region.aerial)),
        ("model", f"{region.model or '?'}{random}"),
        ("embedding", str(get("embedding_key"))),
        ("sampler", f"{get('sampler')} ({get('mode')} mode): {settings}"),
        ("seed", str(get("seed"))),
        ("seam score", f"{seam:.3f} (1: the window edges are invisible)"
         if isinstance(seam, (int, float)) else "?"),
        ("UNet evaluations", f"{evaluations:,} in {get('unet_calls')} calls" if isinstance(evaluations, int) else "?"),
        ("held out", "yes (never trained on)" if record.get("held_out") else "no"),
    ]


def table_rows(rows: list[tuple[str, str]], files: list[Path], page_dir: Path) -> str:
    """Provenance rows as HTML, and a row of links to the stage's own files (for QuPath)."""
    links = " ".join(f'<a href="{html.escape(Path(os.path.relpath(path, page_dir)).as_posix())}">'
                     f"{html.escape(path.name)}</a>" for path in files)
    return "\n".join([*(f"<tr><th>{html.escape(label)}</th><td>{html.escape(text)}</td></tr>" for label, text in rows),
                      f"<tr><th>files</th><td>{links}</td></tr>"])


def panel(role: str) -> str:
    return (f'<figure class="panel"><figcaption>{LABELS[role]}</figcaption><div class="stage">'
            f'<div class="viewer" id="viewer-{role}"></div>'
            f'<div class="scale-bar" id="scale-{role}"><span class="label"></span><div class="bar"></div></div>'
            "</div></figure>")


def page_json(value: Any) -> str:
    """JSON that is safe inside a <script> element."""
    return json.dumps(value, sort_keys=True).replace("<", "\\u003c")


def write_region_page(region: Region, folder: Path, final_folder: Path, settings: ViewerSettings) -> dict[str, Any]:
    """The region's pyramids, thumbnail and page into ``folder``; what the index shows of it."""
    folder.mkdir(parents=True)
    generated = write_dzi(region.generated, folder, "generated", settings)
    pixel_size_um = generated.pixel_size_um or region.pixel_size_um
    images = [("generated", region.generated, generated, pixel_size_um)]
    if region.reference is not None:
        reference = write_dzi(region.reference, folder, "reference", settings)
        # The same region of the slide: a PNG records no resolution, its width says it.
        images.insert(0, ("reference", region.reference, reference,
                          reference.pixel_size_um or pixel_size_um * generated.width / reference.width))
    thumbs = [thumbnail(path, settings.thumbnail_size) for _, path, _, _ in images]
    gap = 4
    sheet = Image.new("RGB", (sum(t.width for t in thumbs) + gap * (len(thumbs) - 1), max(t.height for t in thumbs)),
                      (0, 0, 0))
    left = 0
    for thumb in thumbs:
        sheet.paste(thumb, (left, 0))
        left += thumb.width + gap
    sheet.save(folder / "thumbnail.jpg", quality=90)
    data = {"library": "../../lib/openseadragon",
            "images": [{"role": role, "tileSource": dzi.tile_source(), "pixelSizeUm": size, "width": dzi.width,
                        "height": dzi.height} for role, _, dzi, size in images]}
    rows = table_rows(provenance(region, generated, pixel_size_um), [path for _, path, _, _ in images], final_folder)
    text = template("page.html").substitute(
        title=html.escape(region.title), root="../..", banner=random_banner([region.record]),
        panels="\n".join(panel(role) for role, *_ in images), provenance=rows, data=page_json(data))
    (folder / "index.html").write_text(text)
    page = f"{region.dataset}/{region.name}"
    return {"href": f"{page}/index.html", "thumbnail": f"{page}/thumbnail.jpg", "title": region.name,
            "dataset": region.dataset,
            "facts": f"{generated.width} × {generated.height} px, {pixel_size_text(pixel_size_um, region.aerial)}, "
                     f"seam score {region.record.get('seam_score', float('nan')):.3f}",
            "order": "reference | generated" if region.reference is not None else "generated (no reference)"}


def index_page(cards: list[dict[str, Any]], records: list[dict[str, Any]]) -> str:
    sections = []
    for dataset in dict.fromkeys(card["dataset"] for card in cards):
        items = "\n".join(
            f'<a class="card" href="{c["href"]}"><img src="{c["thumbnail"]}" alt="{html.escape(c["order"])}">'
            f'<div class="title">{html.escape(c["title"])}</div>'
            f'<div class="facts">{html.escape(c["order"])}<br>{html.escape(c["facts"])}</div></a>'
            for c in cards if c["dataset"] == dataset)
        sections.append(f'<section><h2>{html.escape(dataset)}</h2><div class="cards">\n{items}\n</div></section>')
    count = f"{len(cards)} large image{'' if len(cards) == 1 else 's'}."
    return template("index.html").substitute(count=count, banner=random_banner(records), datasets="\n".join(sections))


def build_viewer(results_dir: str | Path, out_dir: str | Path | None = None, *, datasets: list[str] | None = None,
                 settings: ViewerSettings = ViewerSettings()) -> Path:
    """Write the viewer site for the large images under ``results_dir``; return its index.html."""
    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir is not None else results_dir / "viewer"
    regions = read_regions(results_dir, datasets)
    if not regions:
        raise PipelineError(f"{results_dir / 'large_images'}: no large images (run `snakemake large_image` first)")
    library = openseadragon_build()
    with atomic_dir(out) as temp:
        copy_library(library, temp / "lib" / "openseadragon")
        for name in ("viewer.js", "viewer.css"):
            shutil.copy2(HERE / "static" / name, temp / "lib" / name)
        cards = [write_region_page(region, temp / region.dataset / region.name, out / region.dataset / region.name,
                                   settings) for region in regions]
        (temp / "index.html").write_text(index_page(cards, [region.record for region in regions]))
    return out / "index.html"
