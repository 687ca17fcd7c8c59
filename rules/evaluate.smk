# Stage 7: evaluation. One job per dataset: FID/KID-style distances and embedding similarity of the
# generated patches and large images against their real counterparts, and the grid prior's
# samples against the dataset's real embedding grids, in one metrics.json
# (docs/data_contract.md, "Stage 7"). This is the issue's results/<run>/metrics.json with
# run = evaluation/<dataset>. Encoder weights come from the top-level `encoders:` table, because the
# evaluation's feature extractor may be an encoder that the dataset itself does not use.


rule evaluate_dataset:
    input:
        samples=f"{OUT}/samples/{{dataset}}",
        large_images=f"{OUT}/large_images/{{dataset}}/manifest.parquet",
        prior=f"{OUT}/prior/{{dataset}}/prior.json",
        index=f"{OUT}/embeddings/{{dataset}}/index.parquet",
    output:
        f"{OUT}/evaluation/{{dataset}}/metrics.json",
    params:
        pipeline=PIPELINE,
        large_images=lambda w, input: str(Path(input.large_images).parent),
        prior=lambda w, input: str(Path(input.prior).parent),
        embeddings=lambda w, input: str(Path(input.index).parent),
        settings=json.dumps(config["evaluation"], sort_keys=True),
        encoders=json.dumps(config["encoders"], sort_keys=True),
        embedding_key=lambda w: DATASETS[w.dataset].encoders[0],
    log:
        f"{OUT}/logs/evaluate/{{dataset}}.log",
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=120,
        gpu=1,
    shell:
        "OMP_NUM_THREADS={threads} {params.pipeline} evaluate --samples {input.samples:q} "
        "--large-images {params.large_images:q} --settings {params.settings:q} "
        "--encoders {params.encoders:q} --embedding-key {params.embedding_key:q} "
        "--prior {params.prior:q} --embeddings {params.embeddings:q} --dataset {wildcards.dataset} "
        "--out {output:q} > {log:q} 2>&1"


rule evaluate:
    input:
        expand(f"{OUT}/evaluation/{{dataset}}/metrics.json", dataset=EMBEDDED_DATASETS),
