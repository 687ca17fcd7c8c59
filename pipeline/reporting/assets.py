"""Assets of the Snakemake report (`snakemake --report report.html`): small self-contained HTML
tables, JPEG sheets and an SVG chart per dataset, built from what the stages wrote
(docs/data_contract.md, "Report"). Nothing here needs torch or matplotlib: tables come from
pandas' `to_html`, sheets from PIL, the loss curve is SVG written by hand.

Every asset that shows results of randomly initialised models says so on itself (a red banner),
because a reader may see it without its caption.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_file, write_text_atomic

RANDOM_BANNER = ("RANDOM WEIGHTS: {what} randomly initialised (a demo or test run). These results show that "
                 "the pipeline runs end to end; they say nothing about image quality.")

# Plain-language meaning of the tiling stage's failure reasons (docs/data_contract.md, "Stage 1").
REASONS = {
    "not_found": "the file does not exist",
    "empty_file": "the file is empty",
    "open_failed": "the reader does not recognise or cannot parse the file (unsupported format, or truncated)",
    "read_failed": "the file opens, but its pixel data is corrupt",
    "no_mpp": "the file does not record its pixel size; add a row to the dataset's mpp_overrides table",
    "absurd_mpp": "the recorded pixel size is implausible (outside 0.05-100 µm/px)",
    "too_small": "the image is smaller than one patch",
    "no_tissue": "no patch contained enough tissue",
    "unsupported_bands": "the configured bands do not exist in the file",
    "unsupported_dtype": "the pixel data type is not supported",
    "no_crs": "the GeoTIFF has no coordinate reference system",
    "crs_in_degrees": "the GeoTIFF's coordinates are in degrees, not a projected CRS in metres",
    "too_large": "the file claims an image, tile or read size past the tiler's bounds (corrupt or unpyramided)",
    "bad_georeference": "the GeoTIFF's geotransform or CRS is non-finite, degenerate, mirrored or unusable",
    "out_of_memory": "tiling the file needed more memory than its limit",
    "reader_crashed": "the process tiling the file died (the message names the signal)",
    "unexpected_error": "the reader raised an unforeseen error (the message has it; please report it)",
}

# What each metric measures and which direction is better (metrics.json, docs "Stage 7").
METRIC_MEANING = {
    "fid": "Fréchet Inception distance: lower is better, 0 = identical feature statistics",
    "kid": "kernel Inception distance: lower is better, about 0 = same distribution",
    "clip_fid": "Fréchet distance in CLIP ViT-B/32 features: lower is better",
    "clip_kid": "kernel distance in CLIP ViT-B/32 features: lower is better",
    "fd_": "Fréchet distance in {name} features: lower is better; not comparable with FID",
    "kd_": "kernel distance in {name} features: lower is better; not comparable with KID",
    "embedding_cosine": "cosine between each generated image's embedding and the embedding it was generated "
                        "from: higher is better, at most 1; compare with the real images' value",
    "embedding_cosine_real": "the same cosine for the real images that gave the conditions: the ceiling",
}

SCOPES = {
    "patches": "patches: generated vs held-out real",
    "large_image_crops": "large images: 256 px crops, generated vs reference region",
}

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; font-size: 14px; color: #222;
       margin: 12px; background: #fff; }
h1 { font-size: 18px; margin: 0 0 8px 0; } h2 { font-size: 15px; margin: 16px 0 6px 0; }
table { border-collapse: collapse; margin: 6px 0 12px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num, th.num { text-align: right; }
.banner { background: #b00020; color: #fff; padding: 8px 12px; font-weight: bold; margin: 0 0 10px 0; }
.note { color: #555; } .failed { color: #b00020; font-weight: bold; }
"""


class ReportInputError(PipelineError):
    """An asset was asked for without the stage output it is built from."""


# --- shared helpers --------------------------------------------------------------------------------

def html_page(title: str, body: str) -> str:
    """A standalone HTML page (the report shows each one in a frame of its own)."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def banner(lines: Sequence[str]) -> str:
    return "".join(f'<div class="banner">{html.escape(line)}</div>\n' for line in lines)


def table_html(frame: pd.DataFrame, numeric: Sequence[str] = ()) -> str:
    """pandas' to_html with the page's styling; `numeric` columns are right-aligned."""
    text = frame.to_html(index=False, escape=True, border=0, na_rep="", classes="data")
    for column in numeric:
        text = text.replace(f"<th>{html.escape(column)}</th>", f'<th class="num">{html.escape(column)}</th>')
    return text


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_jpeg(image: Image.Image, out: str | Path, quality: int = 90) -> None:
    with atomic_file(out) as temp:
        image.convert("RGB").save(temp, format="JPEG", quality=quality)


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # FreeType build of Pillow >= 10.1: scalable
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def fit(image: Image.Image, max_side: int) -> Image.Image:
    image = image.convert("RGB")
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def placeholder(size: tuple[int, int], text: str) -> Image.Image:
    image = Image.new("RGB", size, (225, 225, 225))
    draw = ImageDraw.Draw(image)
    draw.multiline_text((10, 10), wrap(text, max(10, size[0] // 8)), fill=(90, 90, 90), font=font(14))
    return image


def wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


@dataclass
class Caption:
    """A line of text under or over an image in a sheet."""
    text: str
    color: tuple[int, int, int] = (30, 30, 30)


def wrap_to_width(text: str, typeface: ImageFont.ImageFont, width: float) -> list[str]:
    """Greedy word wrap of `text` so that each line is at most `width` pixels wide."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and typeface.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line]


def title_bar(width: int, lines: Sequence[Caption], size: int = 16) -> Image.Image:
    """Text lines over a sheet, wrapped to its width."""
    typeface = font(size)
    wrapped = [(piece, line.color) for line in lines for piece in wrap_to_width(line.text, typeface, width - 16)]
    bar = Image.new("RGB", (width, 8 + len(wrapped) * (size + 6)), (255, 255, 255))
    draw = ImageDraw.Draw(bar)
    for number, (text, color) in enumerate(wrapped):
        draw.text((8, 6 + number * (size + 6)), text, fill=color, font=typeface)
    return bar


def stack(parts: Sequence[Image.Image], background=(255, 255, 255), min_width: int = 0) -> Image.Image:
    width = max(min_width, *(p.width for p in parts))
    sheet = Image.new("RGB", (width, sum(p.height for p in parts)), background)
    top = 0
    for part in parts:
        sheet.paste(part, (0, top))
        top += part.height
    return sheet


def random_notice(what: Sequence[str]) -> str:
    """The RANDOM WEIGHTS sentence naming what was randomly initialised ("" when nothing was)."""
    if not what:
        return ""
    names = what[0] if len(what) == 1 else f"{', '.join(what[:-1])} and {what[-1]}"
    return RANDOM_BANNER.format(what=f"{names} {'is' if len(what) == 1 else 'are'}")


def random_lines(what: Sequence[str]) -> list[Caption]:
    return [Caption(random_notice(what), (176, 0, 32))] if what else []


# --- tiling: slides table and thumbnail sheet --------------------------------------------------------

def read_status(tiles_dir: str | Path) -> pd.DataFrame:
    path = Path(tiles_dir) / "status.tsv"
    if not path.is_file():
        raise ReportInputError(f"{path}: no tiling status table (run the tile stage first)")
    status = pd.read_csv(path, sep="\t", dtype={"input_id": str, "source": str, "reason": str, "message": str})
    return status


def tiling_summary(status: pd.DataFrame) -> str:
    done = int((status.status == "done").sum())
    failed = len(status) - done
    patches = int(status.patch_count.fillna(0).sum())
    return (f"{len(status)} input{'s' if len(status) != 1 else ''}: {done} tiled, {failed} failed; "
            f"{patches} patches in total")


def _first(row: pd.Series, *names: str) -> Any:
    for name in names:
        value = row.get(name)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            return value
    return None


def slides_table(tiles_dir: str | Path, out: str | Path, dataset: str) -> pd.DataFrame:
    """HTML table: one row per input (slide or GeoTIFF) with its outcome, patch count and, for a failed
    input, the reason in plain words; the dataset's totals above it."""
    status = read_status(tiles_dir)
    rows = []
    for _, row in status.iterrows():
        failed = row.status != "done"
        reason = _first(row, "reason")
        width, height = _first(row, "width"), _first(row, "height")
        pixel = _first(row, "level0_mpp", "source_gsd")
        rows.append({
            "input": row.input_id, "file": row.source,
            "status": "FAILED" if failed else "done",
            "reason": f"{reason}: {REASONS.get(reason, '')}".rstrip(": ") if failed and reason else "",
            "patches": int(row.patch_count) if not pd.isna(row.patch_count) else 0,
            "size (px)": f"{int(width)} × {int(height)}" if width is not None and height is not None else "",
            "source px size": f"{float(pixel):.4g} {'µm' if row.get('kind', 'wsi') != 'aerial' else 'm'}"
                              if pixel is not None else "",
            "pixel size from": _first(row, "mpp_source") or "",
            "message": _first(row, "message") or "",
        })
    table = pd.DataFrame(rows, columns=["input", "file", "status", "reason", "patches", "size (px)",
                                        "source px size", "pixel size from", "message"])
    text = table_html(table, numeric=["patches"]).replace("<td>FAILED</td>", '<td class="failed">FAILED</td>')
    body = (f"<p><b>{html.escape(tiling_summary(status))}</b>.</p>\n"
            '<p class="note">One row per input file. A failed input is recorded with its reason and '
            "the rest of the dataset is processed; its patches are missing from every later stage.</p>\n"
            + text)
    write_text_atomic(out, html_page(f"{dataset}: inputs, patch counts and failures", body))
    return table


def thumbnail_sheet(tiles_dir: str | Path, out: str | Path, dataset: str, cell: int = 360,
                    per_row: int = 4) -> int:
    """JPEG contact sheet of every input's QC thumbnail (tissue mask tinted green, kept patches
    outlined in blue), each labelled with the input's name and patch count, or its failure reason.
    Returns the number of inputs shown."""
    tiles_dir = Path(tiles_dir)
    status = read_status(tiles_dir)
    label_font = font(14)
    tiles = []
    for _, row in status.iterrows():
        path = tiles_dir / "inputs" / str(row.input_id) / "thumbnail.jpg"
        if path.is_file():
            with Image.open(path) as image:
                image.draft("RGB", (cell, cell))
                picture = fit(image, cell)
        else:
            why = row.reason if row.status != "done" and isinstance(row.reason, str) else "none was written"
            picture = placeholder((cell, cell * 2 // 3), f"no thumbnail: {why}")
        failed = row.status != "done"
        second = (f"FAILED: {row.reason}" if failed else
                  f"{int(row.patch_count)} patches kept")
        label = Image.new("RGB", (cell, 44), (255, 255, 255))
        draw = ImageDraw.Draw(label)
        draw.text((4, 3), str(row.input_id)[:48], fill=(20, 20, 20), font=label_font)
        draw.text((4, 22), second, fill=(176, 0, 32) if failed else (40, 40, 40), font=label_font)
        framed = Image.new("RGB", (cell, cell + 44), (255, 255, 255))
        framed.paste(picture, ((cell - picture.width) // 2, 0))
        framed.paste(label, (0, cell))
        tiles.append(framed)
    if not tiles:
        tiles = [placeholder((cell, cell), "the dataset has no inputs")]
    columns = min(per_row, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    gap = 10
    grid = Image.new("RGB", (columns * (cell + gap) + gap, rows * (cell + 44 + gap) + gap), (255, 255, 255))
    for number, tile in enumerate(tiles):
        grid.paste(tile, (gap + (number % columns) * (cell + gap), gap + (number // columns) * (cell + 44 + gap)))
    header = title_bar(grid.width, [
        Caption(f"{dataset}: tissue detection per input ({tiling_summary(status)})"),
        Caption("green tint = tissue mask (slides), blue squares = patches kept", (80, 80, 80))])
    write_jpeg(stack([header, grid]), out)
    return len(status)


# --- training: loss curve -------------------------------------------------------------------------

def read_training_log(training_dir: str | Path) -> pd.DataFrame:
    """Logged steps of every Lightning version (one per start of the run), in step order; a step
    logged again after a restart keeps its latest value. Columns: step, loss, lr, version."""
    frames = []
    for path in Path(training_dir).glob("logs/version_*/metrics.csv"):
        match = re.fullmatch(r"version_(\d+)", path.parent.name)
        frame = pd.read_csv(path)
        if "train/loss" not in frame or frame.empty:
            continue
        frame = frame.rename(columns={"train/loss": "loss", "train/lr": "lr"})
        frame["version"] = int(match.group(1)) if match else 0
        frames.append(frame[[c for c in ("step", "loss", "lr", "version") if c in frame]])
    if not frames:
        return pd.DataFrame(columns=["step", "loss", "lr", "version"])
    log = pd.concat(frames).dropna(subset=["loss"]).sort_values(["version", "step"])
    log = log.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
    return log


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if not math.isfinite(low) or not math.isfinite(high) or high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 12) for i in range(int((high - first) / step + 1e-9) + 1)]


def _fmt(value: float) -> str:
    return f"{value:.3g}" if value != 0 else "0"


def svg_panel(x: np.ndarray, y: np.ndarray, box: tuple[float, float, float, float], title: str, color: str,
              x_range: tuple[float, float], log: bool = False, smooth: np.ndarray | None = None,
              marks: Sequence[float] = ()) -> list[str]:
    """SVG elements of one line chart in `box` (left, top, width, height): axes, ticks, the series."""
    left, top, width, height = box
    values = np.log10(y) if log else y
    lo, hi = float(np.min(values)), float(np.max(values))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * max(abs(lo), 1e-3), hi + 0.5 * max(abs(hi), 1e-3)
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    x0, x1 = x_range

    def px(v: float) -> float:
        return left + (v - x0) / (x1 - x0 or 1) * width

    def py(v: float) -> float:
        return top + height - (v - lo) / (hi - lo) * height

    out = [f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#888"/>',
           f'<text x="{left}" y="{top - 8}" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    if log:
        ticks = [t for t in range(math.floor(lo), math.ceil(hi) + 1) if lo <= t <= hi]
        if len(ticks) < 2:
            ticks = nice_ticks(lo, hi, 4)
        labels = [_fmt(10 ** t) for t in ticks]
    else:
        ticks = nice_ticks(lo, hi, 4)
        labels = [_fmt(t) for t in ticks]
    for tick, label in zip(ticks, labels):
        if lo <= tick <= hi:
            out.append(f'<line x1="{left}" x2="{left + width}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" '
                       f'stroke="#e4e4e4"/>')
            out.append(f'<text x="{left - 6}" y="{py(tick) + 4:.1f}" font-size="11" text-anchor="end">{label}</text>')
    for mark in marks:
        out.append(f'<line x1="{px(mark):.1f}" x2="{px(mark):.1f}" y1="{top}" y2="{top + height}" '
                   f'stroke="#d08000" stroke-dasharray="4 3"/>')
    points = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x, values))
    faint = smooth is not None
    out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="{1 if faint else 1.8}" '
               f'stroke-opacity="{0.35 if faint else 1}"/>')
    if len(x) <= 40:
        out.extend(f'<circle cx="{px(a):.1f}" cy="{py(b):.1f}" r="2.5" fill="{color}"/>' for a, b in zip(x, values))
    if smooth is not None:
        values = np.log10(smooth) if log else smooth
        points = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x, values))
        out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
    return out


def loss_curve(training_dir: str | Path, out: str | Path, dataset: str) -> pd.DataFrame:
    """SVG of the training loss (top; log scale when it spans more than a factor of 20, with a moving
    average when there are many points) and the learning rate (bottom) against the optimiser step.
    Dashed lines mark where a restarted run continued."""
    log = read_training_log(training_dir)
    done = read_json(Path(training_dir) / "done.json") or {}
    width, height = 760, 492
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif">',
             f'<rect width="{width}" height="{height}" fill="#fff"/>',
             f'<text x="20" y="24" font-size="15" font-weight="bold">{html.escape(dataset)}: training loss '
             f'(noise-prediction MSE) by optimiser step</text>']
    if log.empty:
        parts.append('<text x="20" y="70" font-size="14">No training log found (logs/version_*/metrics.csv).</text>')
    else:
        x = log.step.to_numpy(float)
        loss = log.loss.to_numpy(float)
        x_range = (0.0, max(float(x.max()), float(done.get("max_steps") or 0), 1.0))
        positive = loss[loss > 0]
        use_log = len(positive) == len(loss) and positive.max() / positive.min() > 20
        window = max(1, len(loss) // 20)
        smooth = (pd.Series(loss).rolling(window, min_periods=1, center=True).mean().to_numpy()
                  if window > 2 else None)
        restarts = [float(group.step.min()) for _, group in log.groupby("version")][1:]
        parts += svg_panel(x, loss, (80, 60, 650, 240), "loss" + (" (log scale)" if use_log else ""), "#1f5fbf",
                           x_range, log=use_log, smooth=smooth, marks=restarts)
        if "lr" in log and log.lr.notna().any():
            lr = log.lr.to_numpy(float)
            parts += svg_panel(x, lr, (80, 340, 650, 80), "learning rate", "#2a8f3a", x_range)
        for tick in nice_ticks(*x_range, 6):
            xpos = 80 + (tick - x_range[0]) / (x_range[1] - x_range[0]) * 650
            parts.append(f'<text x="{xpos:.1f}" y="{438}" font-size="11" text-anchor="middle">{_fmt(tick)}</text>')
        last = loss[-max(1, len(loss) // 10):].mean()
        note = (f"{len(log)} logged steps, last at step {int(x.max())}; mean of the last tenth {last:.4g}"
                + (f"; {len(restarts)} restart(s), dashed" if restarts else ""))
        parts.append('<text x="405" y="456" font-size="12" text-anchor="middle">optimiser step</text>')
        parts.append(f'<text x="80" y="480" font-size="12" fill="#444">{html.escape(note)}</text>')
    parts.append("</svg>\n")
    write_text_atomic(out, "\n".join(parts))
    return log


# --- samples and large images -----------------------------------------------------------------------

def read_image(path: str | Path, max_side: int) -> Image.Image:
    """An image file downscaled to at most max_side: PNG/JPEG through PIL, pyramidal TIFF through
    tifffile from the smallest pyramid level that is still at least max_side (never the full image
    when a level will do)."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            levels = list(getattr(series, "levels", None) or [series])
            chosen = levels[0]
            for level in levels:
                if max(level.shape[:2]) >= max_side:
                    chosen = level
            array = chosen.asarray()
        if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
            array = np.moveaxis(array, 0, -1)  # planar (samples first)
        image = Image.fromarray(np.ascontiguousarray(array[..., :3] if array.ndim == 3 else array))
    else:
        with Image.open(path) as opened:
            opened.draft("RGB", (max_side, max_side))
            image = opened.convert("RGB")
    return fit(image, max_side)


def sample_pairs(samples_dir: str | Path, out: str | Path, dataset: str, max_pairs: int = 16,
                 per_row: int = 4, side: int = 256) -> int:
    """JPEG sheet of real held-out patches, each next to the patch generated from its embedding,
    spread evenly over the samples; returns the number of pairs shown."""
    samples_dir = Path(samples_dir)
    manifest = pd.read_parquet(samples_dir / "manifest.parquet")
    summary = read_json(samples_dir / "sample.json") or {}
    chosen = manifest.iloc[np.unique(np.linspace(0, len(manifest) - 1, min(max_pairs, len(manifest))).round()
                                     .astype(int))] if len(manifest) else manifest
    gap, label_height = 12, 22
    cell = 2 * side + 4
    columns = max(1, min(per_row, len(chosen)))
    rows = max(1, math.ceil(len(chosen) / columns))
    grid = Image.new("RGB", (columns * (cell + gap) + gap, rows * (side + 2 * label_height + gap) + gap),
                     (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    small = font(13)
    for number, row in enumerate(chosen.itertuples()):
        left = gap + (number % columns) * (cell + gap)
        top = gap + (number // columns) * (side + 2 * label_height + gap)
        draw.text((left + 2, top + 2), "real", fill=(20, 20, 20), font=small)
        draw.text((left + side + 6, top + 2), "generated", fill=(31, 95, 191), font=small)
        for offset, name in ((0, row.real), (side + 4, row.generated)):
            grid.paste(read_image(samples_dir / name, side), (left + offset, top + label_height))
        draw.text((left + 2, top + label_height + side + 3), str(row.sample_id)[:60], fill=(90, 90, 90), font=small)
    if len(chosen) == 0:
        draw.text((gap, gap), "no samples", fill=(90, 90, 90), font=small)
    sampler = summary.get("sampler", {})
    lines = [Caption(f"{dataset}: {len(chosen)} of {len(manifest)} held-out patches (left) and the patch "
                     f"generated from each one's {summary.get('embedding_key', 'SSL')} embedding (right)"),
             Caption(f"sampler {sampler.get('sampler', '?')}, {sampler.get('steps', '?')} steps, guidance "
                     f"{sampler.get('guidance_scale', '?')}; pixel size {summary.get('mpp', '?')}", (80, 80, 80))]
    lines += random_lines(["the diffusion model's autoencoder"] if summary.get("random_weights") else [])
    write_jpeg(stack([title_bar(grid.width, lines), grid]), out)
    return len(chosen)


def large_image_sheet(large_images_dir: str | Path, out: str | Path, dataset: str, max_side: int = 768,
                      max_regions: int = 8) -> int:
    """JPEG sheet: per region, the real reference region (left) next to the large image generated
    from its grid of embeddings (right), each downscaled to at most max_side."""
    folder = Path(large_images_dir)
    manifest = pd.read_parquet(folder / "manifest.parquet")
    shown = manifest.head(max_regions)
    label_font = font(14)
    rows = []
    for region in shown.to_dict("records"):
        images = []
        for prefix in ("reference", "generated"):
            name = region.get(f"{prefix}_png") or region.get(f"{prefix}_tif")
            images.append(read_image(folder / name, max_side) if isinstance(name, str) and (folder / name).is_file()
                          else placeholder((max_side // 2, max_side // 2), f"no {prefix} image"))
        height = max(image.height for image in images)
        row = Image.new("RGB", (images[0].width + images[1].width + 30, height + 48), (255, 255, 255))
        draw = ImageDraw.Draw(row)
        details = (f"{region.get('region')}: {region.get('k')}x{region.get('k')} patches of input "
                   f"{region.get('input_id')} from col {region.get('col')}, row {region.get('row')}; "
                   f"{region.get('width')}x{region.get('height')} px")
        if region.get("seam_score") is not None:
            details += f"; seam score {region['seam_score']:.3f}"
        draw.text((10, 4), details, fill=(20, 20, 20), font=label_font)
        draw.text((10, 24), "real reference", fill=(20, 20, 20), font=label_font)
        draw.text((images[0].width + 20, 24), "generated", fill=(31, 95, 191), font=label_font)
        row.paste(images[0], (10, 46))
        row.paste(images[1], (images[0].width + 20, 46))
        rows.append(row)
    if not rows:
        rows = [placeholder((max_side, 100), "no large images")]
    first = manifest.iloc[0].to_dict() if len(manifest) else {}
    lines = [Caption(f"{dataset}: {len(shown)} of {len(manifest)} large images, each next to the real region "
                     f"whose embeddings it was generated from"),
             Caption(f"mode {first.get('mode', '?')}, sampler {first.get('sampler', '?')}, {first.get('steps', '?')} "
                     f"steps, guidance {first.get('guidance_scale', '?')}; pixel size {first.get('mpp', '?')}; shown "
                     f"downscaled to at most {max_side} px", (80, 80, 80))]
    lines += random_lines(["the diffusion model's autoencoder"] if manifest.get("random_weights", pd.Series(
        [], dtype=bool)).astype(bool).any() else [])
    write_jpeg(stack([title_bar(max(r.width for r in rows), lines), *rows]), out)
    return len(shown)


# --- evaluation: metrics table ------------------------------------------------------------------

def metric_meaning(name: str) -> str:
    base = name[len("crop_"):] if name.startswith("crop_") else name
    if base in METRIC_MEANING:
        return METRIC_MEANING[base]
    for prefix in ("fd_", "kd_"):
        if base.startswith(prefix):
            return METRIC_MEANING[prefix].format(name=base[len(prefix):])
    return ""


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.4g}"


def metrics_random(metrics: dict[str, Any]) -> list[str]:
    """What in a metrics.json was randomly initialised: the feature extractor(s), the generating model."""
    what = []
    for metric in metrics.get("metrics", []):
        extractor = metric.get("feature_extractor") or {}
        if extractor.get("random_weights") or any("RANDOM weights" in w for w in metric.get("warnings") or []):
            name = f"the evaluation's feature extractor {extractor.get('name', '')}".strip()
            if name not in what:
                what.append(name)
        if (metric.get("sampler") or {}).get("random_weights") and "the diffusion model's autoencoder" not in what:
            what.append("the diffusion model's autoencoder")
    return what


def metrics_frame(metrics: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for metric in metrics.get("metrics", []):
        extractor = metric.get("feature_extractor") or {}
        counts = metric.get("samples") or {}
        notes = list(metric.get("warnings") or [])
        if "std" in metric:
            notes.append(f"std {_number(metric['std'])}, min {_number(metric.get('min'))}, median "
                         f"{_number(metric.get('median'))}, max {_number(metric.get('max'))}")
        if metric.get("regions") is not None:
            notes.append(f"{metric['regions']} region(s)")
        rows.append({
            "images": SCOPES.get(metric.get("scope"), metric.get("scope")),
            "metric": metric.get("name"), "value": _number(metric.get("value")),
            "generated": counts.get("generated", 0), "real": counts.get("real", 0),
            "features": f"{extractor.get('name', '?')}" + (" (RANDOM weights)" if extractor.get("random_weights")
                                                            else ""),
            "meaning": metric_meaning(str(metric.get("name"))), "notes": "; ".join(notes),
        })
    return pd.DataFrame(rows, columns=["images", "metric", "value", "generated", "real", "features", "meaning",
                                       "notes"])


def metrics_table(metrics_path: str | Path, out: str | Path, dataset: str) -> pd.DataFrame:
    """HTML table of metrics.json: every metric with its value, the image counts behind it, the
    features it was computed in, what it means, and its warnings; skipped metrics below."""
    metrics = json.loads(Path(metrics_path).read_text())
    frame = metrics_frame(metrics)
    body = banner([random_notice(metrics_random(metrics))] if metrics_random(metrics) else [])
    body += ('<p class="note">"generated" and "real" are the numbers of images in each set; with few images '
             "the distances are noisy and biased upwards, so only compare runs with similar counts.</p>\n")
    body += table_html(frame, numeric=["value", "generated", "real"])
    skipped = metrics.get("skipped") or []
    if skipped:
        body += "<h2>Not computed</h2>\n" + table_html(pd.DataFrame(skipped, columns=["name", "reason"]))
    settings = metrics.get("settings") or {}
    body += (f'<p class="note">Feature extractor setting: {html.escape(str(settings.get("feature_extractor")))}; '
             f"source: {html.escape(str(metrics_path))}.</p>\n")
    write_text_atomic(out, html_page(f"{dataset}: evaluation metrics", body))
    return frame


# --- the overview ------------------------------------------------------------------------------------

def encoder_random(index_path: str | Path | None) -> list[str]:
    """Encoders whose embeddings in the dataset index came from random weights."""
    if not index_path or not Path(index_path).is_file():
        return []
    import pyarrow.parquet as pq

    names = [n for n in pq.read_schema(index_path).names if n.endswith("_weights_sha256")]
    if not names:
        return []
    table = pd.read_parquet(index_path, columns=names)
    return [f"the conditioning encoder {n[: -len('_weights_sha256')]}" for n in names
            if (table[n].astype(str) == "random").any()]


STAGES = {
    "tiling": "the input images are cut into square patches at one physical resolution; only patches "
              "that are mostly tissue (slides) or valid data (aerial) are kept",
    "embeddings": "a self-supervised encoder turns every patch into a vector that describes its content",
    "training": "a latent diffusion model learns to generate a patch given that vector",
    "patches": "for each held-out real patch (never seen in training) a new patch is generated from its vector",
    "large images": "for real k x k blocks of adjacent patches, one large image is generated from the grid of "
                    "their vectors",
    "evaluation": "generated and real images are compared in feature space (distances: lower is better) and "
                  "by how well the generated images keep their vectors (cosine: higher is better)",
}


def summary_page(out: str | Path, dataset: str, *, tiles: str | Path | None = None,
                 embeddings_index: str | Path | None = None, training: str | Path | None = None,
                 samples: str | Path | None = None, large_images: str | Path | None = None,
                 metrics: str | Path | None = None) -> list[dict[str, str]]:
    """HTML overview of one dataset: a row per stage saying what the stage does, what it did here and
    its headline numbers, under a banner naming every randomly initialised model."""
    rows: list[dict[str, str]] = []
    random_what: list[str] = []

    def add(stage: str, result: str) -> None:
        rows.append({"stage": f"{len(rows) + 1}. {stage}", "what it does": STAGES[stage], "result": result})

    if tiles:
        status = read_status(tiles)
        failed = status[status.status != "done"]
        text = tiling_summary(status)
        if len(failed):
            text += ". Failed: " + ", ".join(f"{r.source} ({r.reason})" for r in failed.itertuples())
        add("tiling", text)
    if embeddings_index:
        index = pd.read_parquet(embeddings_index, columns=["key"])
        import pyarrow.parquet as pq

        encoders = [n[: -len("_weights_sha256")] for n in pq.read_schema(embeddings_index).names
                    if n.endswith("_weights_sha256")]
        random_what += encoder_random(embeddings_index)
        add("embeddings", f"{len(index)} patches embedded with {', '.join(encoders) or '?'}")
    if training:
        log = read_training_log(training)
        done = read_json(Path(training) / "done.json") or {}
        text = f"trained to step {done.get('max_steps', '?')}"
        if not log.empty:
            tail = log.loss.iloc[-max(1, len(log) // 10):].mean()
            text += (f"; loss {log.loss.iloc[0]:.4g} at step {int(log.step.iloc[0])}, "
                     f"{tail:.4g} over the last tenth of the log")
            if log.version.nunique() > 1:
                text += f"; continued after {log.version.nunique() - 1} restart(s)"
        add("training", text)
    if samples:
        summary = read_json(Path(samples) / "sample.json") or {}
        sampler = summary.get("sampler", {})
        if summary.get("random_weights"):
            random_what.append("the diffusion model's autoencoder")
        add("patches", f"{summary.get('samples', '?')} patches generated from "
                       f"{summary.get('embedding_key', '?')} embeddings ({sampler.get('sampler', '?')}, "
                       f"{sampler.get('steps', '?')} steps, guidance {sampler.get('guidance_scale', '?')})")
    if large_images:
        manifest = pd.read_parquet(Path(large_images) / "manifest.parquet")
        sizes = sorted({f"{w}x{h}" for w, h in zip(manifest.get("width", []), manifest.get("height", []))})
        ks = sorted({int(k) for k in manifest.get("k", [])})
        add("large images", f"{len(manifest)} large image(s) of {', '.join(sizes) or '?'} px from "
                            f"{' / '.join(f'{k}x{k}' for k in ks) or 'k x k'} regions")
    if metrics:
        record = json.loads(Path(metrics).read_text())
        for what in metrics_random(record):
            if what not in random_what:
                random_what.append(what)
        headline = []
        for metric in record.get("metrics", []):
            counts = metric.get("samples") or {}
            shown = f"{metric['name']} = {_number(metric.get('value'))}"
            if counts.get("generated") and counts.get("real"):
                shown += f" ({counts['generated']} generated vs {counts['real']} real)"
            headline.append(shown)
        add("evaluation", "; ".join(headline) or "no metric computed")
    body = banner([random_notice(random_what)] if random_what else [])
    body += table_html(pd.DataFrame(rows, columns=["stage", "what it does", "result"]))
    write_text_atomic(out, html_page(f"{dataset}: what was done", body))
    return rows


# --- the command ---------------------------------------------------------------------------------

def build_assets(*, dataset: str, tiles: str | None = None, slides_table_out: str | None = None,
                 thumbnails_out: str | None = None, training: str | None = None, loss_curve_out: str | None = None,
                 samples: str | None = None, sample_pairs_out: str | None = None, large_images: str | None = None,
                 large_image_sheet_out: str | None = None, metrics: str | None = None,
                 metrics_table_out: str | None = None, embeddings_index: str | None = None,
                 summary_out: str | None = None) -> list[str]:
    """Write each asset whose output path is given, from the stage output it needs; returns what was
    written. An asset asked for without its input is an error (nothing is written then)."""
    # (output, builder, its input, the flag that gives the input)
    assets = [(slides_table_out, slides_table, tiles, "--tiles"), (thumbnails_out, thumbnail_sheet, tiles, "--tiles"),
              (loss_curve_out, loss_curve, training, "--training"),
              (sample_pairs_out, sample_pairs, samples, "--samples"),
              (large_image_sheet_out, large_image_sheet, large_images, "--large-images"),
              (metrics_table_out, metrics_table, metrics, "--metrics")]
    for out, _, source, flag in assets:
        if out and not source:
            raise ReportInputError(f"{out}: needs {flag}")
    written = []
    for out, build, source, _ in assets:
        if out:
            build(source, out, dataset)
            written.append(out)
    if summary_out:
        summary_page(summary_out, dataset, tiles=tiles, embeddings_index=embeddings_index, training=training,
                     samples=samples, large_images=large_images, metrics=metrics)
        written.append(summary_out)
    return written
