# Stage 8: the report. `snakemake --report report.html` gathers the outputs marked with report()
# below into one self-contained HTML file, each with its caption from report/*.rst. These rules
# only build the assets (tables, image sheets, the loss curve) under OUT/report/<dataset>/, through
# `pipeline report-assets` (pipeline/reporting/assets.py, one module per asset); `snakemake report` builds them all.


rule report_tiling:
    input:
        status=f"{OUT}/tiles/{{dataset}}/status.tsv",
    output:
        slides=report(
            f"{OUT}/report/{{dataset}}/slides.html",
            caption="../report/slides.rst",
            category="2. Inputs and tissue",
            subcategory="{dataset}",
            labels={"item": "inputs, patch counts, failures", "dataset": "{dataset}"},
        ),
        thumbnails=report(
            f"{OUT}/report/{{dataset}}/thumbnails.jpg",
            caption="../report/thumbnails.rst",
            category="2. Inputs and tissue",
            subcategory="{dataset}",
            labels={"item": "tissue-mask thumbnails", "dataset": "{dataset}"},
        ),
    params:
        pipeline=PIPELINE,
        tiles=lambda w, input: str(Path(input.status).parent),
    log:
        f"{OUT}/logs/report/{{dataset}}.tiling.log",
    conda:
        "../envs/torch.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{params.pipeline} report-assets --dataset {wildcards.dataset:q} --tiles {params.tiles:q} "
        "--slides-table {output.slides:q} --thumbnails {output.thumbnails:q} > {log:q} 2>&1"


rule report_dataset:
    input:
        status=f"{OUT}/tiles/{{dataset}}/status.tsv",
        index=f"{OUT}/embeddings/{{dataset}}/index.parquet",
        training=f"{OUT}/training/{{dataset}}/done.json",
        samples=f"{OUT}/samples/{{dataset}}",
        large_images=f"{OUT}/large_images/{{dataset}}/manifest.parquet",
        metrics=f"{OUT}/evaluation/{{dataset}}/metrics.json",
        generated=f"{OUT}/generated/{{dataset}}/manifest.parquet",
    output:
        summary=report(
            f"{OUT}/report/{{dataset}}/summary.html",
            caption="../report/summary.rst",
            category="1. Overview",
            subcategory="{dataset}",
            labels={"item": "what was done", "dataset": "{dataset}"},
        ),
        loss=report(
            f"{OUT}/report/{{dataset}}/loss.svg",
            caption="../report/loss.rst",
            category="3. Training",
            subcategory="{dataset}",
            labels={"item": "loss curve", "dataset": "{dataset}"},
        ),
        pairs=report(
            f"{OUT}/report/{{dataset}}/sample_pairs.jpg",
            caption="../report/sample_pairs.rst",
            category="4. Patches: real vs generated",
            subcategory="{dataset}",
            labels={"item": "real | generated patches", "dataset": "{dataset}"},
        ),
        large=report(
            f"{OUT}/report/{{dataset}}/large_images.jpg",
            caption="../report/large_images.rst",
            category="5. Large images",
            subcategory="{dataset}",
            labels={"item": "reference | generated regions", "dataset": "{dataset}"},
        ),
        generated=report(
            f"{OUT}/report/{{dataset}}/generated.jpg",
            caption="../report/generated.rst",
            category="5. Large images",
            subcategory="{dataset}",
            labels={"item": "reference-free images (prior)", "dataset": "{dataset}"},
        ),
        metrics=report(
            f"{OUT}/report/{{dataset}}/metrics.html",
            caption="../report/metrics.rst",
            category="6. Metrics",
            subcategory="{dataset}",
            labels={"item": "metrics table", "dataset": "{dataset}"},
        ),
    params:
        pipeline=PIPELINE,
        tiles=lambda w, input: str(Path(input.status).parent),
        training=lambda w, input: str(Path(input.training).parent),
        large_images=lambda w, input: str(Path(input.large_images).parent),
        generated=lambda w, input: str(Path(input.generated).parent),
        random_models=lambda w: random_weight_models(config, DATASETS[w.dataset].encoders),
    log:
        f"{OUT}/logs/report/{{dataset}}.log",
    conda:
        "../envs/torch.yaml"
    resources:
        mem_mb=4000,
        runtime=20,
    shell:
        "{params.pipeline} report-assets --dataset {wildcards.dataset:q} --tiles {params.tiles:q} "
        "--embeddings-index {input.index:q} --training {params.training:q} --samples {input.samples:q} "
        "--large-images {params.large_images:q} --metrics {input.metrics:q} --summary {output.summary:q} "
        "--loss-curve {output.loss:q} --sample-pairs {output.pairs:q} "
        "--large-image-sheet {output.large:q} --metrics-table {output.metrics:q} "
        "--generated {params.generated:q} --generated-sheet {output.generated:q} > {log:q} 2>&1"


rule report_stain:
    input:
        tiles=lambda w: first_stained_input(w.dataset, "tiles"),
        stain=lambda w: first_stained_input(w.dataset, "stain"),
    output:
        sheet=report(
            f"{OUT}/report/{{dataset}}/stain.jpg",
            caption="../report/stain.rst",
            category="2. Inputs and tissue",
            subcategory="{dataset}",
            labels={"item": "stain normalisation: before | after", "dataset": "{dataset}"},
        ),
    params:
        pipeline=PIPELINE,
        method=lambda w: DATASETS[w.dataset].stain_normalization["method"],
        target=lambda w: Path(DATASETS[w.dataset].stain_normalization["target"]).name,
    log:
        f"{OUT}/logs/report/{{dataset}}.stain.log",
    conda:
        "../envs/tiling.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{params.pipeline} stain-sheet --dataset {wildcards.dataset:q} --tiles {input.tiles:q} "
        "--stain {input.stain:q} --out {output.sheet:q} > {log:q} 2>&1"


rule report:
    input:
        expand(f"{OUT}/report/{{dataset}}/{{asset}}", dataset=DATASETS, asset=["slides.html", "thumbnails.jpg"]),
        expand(
            f"{OUT}/report/{{dataset}}/{{asset}}",
            dataset=EMBEDDED_DATASETS,
            asset=["summary.html", "loss.svg", "sample_pairs.jpg", "large_images.jpg", "generated.jpg", "metrics.html"],
        ),
        expand(f"{OUT}/report/{{dataset}}/stain.jpg", dataset=STAINED_DATASETS),
