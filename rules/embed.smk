# Stage 2: SSL embeddings. One job per tiled input (all of the dataset's encoders at once), then
# one index per dataset. The declared output is the input's manifest, written last: its shards
# are written one by one, atomically, and survive a killed job, so a re-run resumes.


rule embed_input:
    input:
        tiles=lambda w: patches_to_embed(w.dataset, w.input_id),  # tiles, or stain-normalised tiles
    output:
        f"{OUT}/embeddings/{{dataset}}/inputs/{{input_id}}/manifest.parquet",
    params:
        pipeline=PIPELINE,
        out_dir=lambda w, output: str(Path(output[0]).parent),
        encoders=lambda w: encoder_settings_json(w.dataset),
        settings=json.dumps(config["embedding"], sort_keys=True),
    log:
        f"{OUT}/logs/embed/{{dataset}}/{{input_id}}.log",
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=1,
    shell:
        "{params.pipeline} embed-input --tiles {input.tiles:q} --out {params.out_dir:q} "
        "--encoders {params.encoders:q} --settings {params.settings:q} > {log:q} 2>&1"


rule embed_dataset:
    input:
        lambda w: expand(
            f"{OUT}/embeddings/{{dataset}}/inputs/{{input_id}}/manifest.parquet",
            dataset=w.dataset,
            input_id=tiled_inputs(w.dataset),
        ),
    output:
        f"{OUT}/embeddings/{{dataset}}/index.parquet",
    params:
        pipeline=PIPELINE,
    log:
        f"{OUT}/logs/embed/{{dataset}}/index.log",
    conda:
        "../envs/torch.yaml"
    shell:
        "{params.pipeline} embed-index --out {output:q} {input:q} > {log:q} 2>&1"


rule embed:
    input:
        expand(f"{OUT}/embeddings/{{dataset}}/index.parquet", dataset=EMBEDDED_DATASETS),
