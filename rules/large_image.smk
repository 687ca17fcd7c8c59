# Stage 6: large images. One job per dataset: `large_image.regions` real k x k regions of adjacent
# patches, each generated from its embedding grid. Region folders are written atomically and
# reused by a re-run with the same settings; the manifest, written last, is the declared output.


rule large_image_dataset:
    input:
        model=f"{OUT}/models/{{dataset}}",
        index=f"{OUT}/embeddings/{{dataset}}/index.parquet",
    output:
        f"{OUT}/large_images/{{dataset}}/manifest.parquet",
    params:
        pipeline=pipeline_on_gpus(config["large_image"]["devices"]),
        embeddings=lambda w, input: str(Path(input.index).parent),
        out_dir=lambda w, output: str(Path(output[0]).parent),
        spec=lambda w: DATASETS[w.dataset].to_json(),
        settings=json.dumps(config["large_image"], sort_keys=True),
        seed=config["seed"],
    log:
        f"{OUT}/logs/large_image/{{dataset}}.log",
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=32000,
        runtime=720,
        gpu=config["large_image"]["devices"],
    shell:
        "OMP_NUM_THREADS={threads} {params.pipeline} large-image --model {input.model:q} "
        "--embeddings {params.embeddings:q} --spec {params.spec:q} --settings {params.settings:q} "
        "--seed {params.seed} --out {params.out_dir:q} > {log:q} 2>&1"


rule large_image:
    input:
        expand(f"{OUT}/large_images/{{dataset}}/manifest.parquet", dataset=EMBEDDED_DATASETS),
