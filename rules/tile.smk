# Stage 1: tiling. One job per slide or GeoTIFF, then one summary per dataset: a checkpoint, because
# which inputs kept patches (and so get embedding jobs) is known only once it has run.


rule tile_input:
    input:
        existing_input=lambda w: existing(DATASETS[w.dataset].inputs[w.input_id]),
    output:
        directory(f"{OUT}/tiles/{{dataset}}/inputs/{{input_id}}"),
    params:
        pipeline=PIPELINE,
        spec=lambda w: DATASETS[w.dataset].only(w.input_id).to_json(),
    log:
        f"{OUT}/logs/tile/{{dataset}}/{{input_id}}.log",
    conda:
        "../envs/tiling.yaml"
    resources:
        mem_mb=4000,
        runtime=120,
    shell:
        "{params.pipeline} tile-input --spec {params.spec:q} --input-id {wildcards.input_id:q} "
        "--out {output:q} > {log:q} 2>&1"


checkpoint tile_dataset:
    input:
        lambda w: expand(
            f"{OUT}/tiles/{{dataset}}/inputs/{{input_id}}",
            dataset=w.dataset,
            input_id=DATASETS[w.dataset].inputs,
        ),
    output:
        status=f"{OUT}/tiles/{{dataset}}/status.tsv",
        manifest=f"{OUT}/tiles/{{dataset}}/manifest.parquet",
    params:
        pipeline=PIPELINE,
    log:
        f"{OUT}/logs/tile/{{dataset}}/summary.log",
    conda:
        "../envs/tiling.yaml"
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "{params.pipeline} tile-summary --status {output.status:q} --manifest {output.manifest:q} "
        "{input:q} > {log:q} 2>&1 && cat {log:q}"


rule tile:
    input:
        expand(f"{OUT}/tiles/{{dataset}}/status.tsv", dataset=DATASETS),
