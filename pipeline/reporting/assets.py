"""`pipeline report-assets`: builds the Snakemake report's assets (`snakemake --report report.html`)
from what the stages wrote, each read with its stage's own reader (docs/data_contract.md,
"Report"). Each asset has its module: `tiling` (slides.html, thumbnails.jpg), `charts`
(loss.svg, matplotlib), `samples` (sample_pairs.jpg), `large_images` (large_images.jpg),
`metrics` (metrics.html), `summary` (summary.html).

Every asset that shows results of randomly initialised models says so on itself (a red banner),
because a reader may see it without its caption.
"""

from __future__ import annotations

from pipeline.errors import PipelineError
from pipeline.reporting.charts import loss_curve
from pipeline.reporting.generated import generated_sheet
from pipeline.reporting.large_images import large_image_sheet
from pipeline.reporting.metrics import metrics_table
from pipeline.reporting.samples import sample_pairs
from pipeline.reporting.summary import summary_page
from pipeline.reporting.tiling import slides_table, thumbnail_sheet


class ReportInputError(PipelineError):
    """An asset was asked for without the stage output it is built from."""


def build_assets(*, dataset: str, tiles: str | None = None, slides_table_out: str | None = None,
                 thumbnails_out: str | None = None, training: str | None = None, loss_curve_out: str | None = None,
                 samples: str | None = None, sample_pairs_out: str | None = None, large_images: str | None = None,
                 large_image_sheet_out: str | None = None, metrics: str | None = None,
                 metrics_table_out: str | None = None, embeddings_index: str | None = None,
                 summary_out: str | None = None, generated: str | None = None,
                 generated_sheet_out: str | None = None) -> list[str]:
    """Write each asset whose output path is given, from the stage output it needs; returns what was
    written. An asset asked for without its input is an error (nothing is written then)."""
    # (output, builder, its input, the flag that gives the input)
    assets = [(slides_table_out, slides_table, tiles, "--tiles"), (thumbnails_out, thumbnail_sheet, tiles, "--tiles"),
              (loss_curve_out, loss_curve, training, "--training"),
              (sample_pairs_out, sample_pairs, samples, "--samples"),
              (large_image_sheet_out, large_image_sheet, large_images, "--large-images"),
              (metrics_table_out, metrics_table, metrics, "--metrics"),
              (generated_sheet_out, generated_sheet, generated, "--generated")]
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
