# Stage 1b: stain normalisation (datasets with `stain_normalization`; absent = off). One job per tiled
# input, in tiatoolbox's own environment (STAIN_PIPELINE, rules/common.smk). The folder is renamed
# into place when complete; a killed job's finished shards wait beside it and a re-run resumes.


rule stain_normalize_input:
    input:
        tiles=f"{OUT}/tiles/{{dataset}}/inputs/{{input_id}}",
        target=lambda w: DATASETS[w.dataset].stain_normalization["target"],
    output:
        directory(f"{OUT}/stain/{{dataset}}/inputs/{{input_id}}"),
    params:
        pipeline=STAIN_PIPELINE,
        settings=lambda w: json.dumps(DATASETS[w.dataset].stain_normalization, sort_keys=True),
        jpeg_quality=lambda w: DATASETS[w.dataset].jpeg_quality,
    log:
        f"{OUT}/logs/stain/{{dataset}}/{{input_id}}.log",
    conda:
        "../envs/tiatoolbox.yaml"
    resources:
        mem_mb=4000,
        runtime=240,
    shell:
        "{params.pipeline} stain-input --tiles {input.tiles:q} --out {output:q} --settings {params.settings:q} "
        "--jpeg-quality {params.jpeg_quality} > {log:q} 2>&1"


rule stain:
    input:
        lambda w: [
            f"{OUT}/stain/{dataset}/inputs/{input_id}"
            for dataset in STAINED_DATASETS
            for input_id in tiled_inputs(dataset)  # inputs that kept patches
        ],
