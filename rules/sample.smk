# Stage 5: patch synthesis. One job per dataset: one generated patch per held-out real patch
# (datasets.<name>.holdout), conditioned on its embedding. The output folder is written atomically.


rule sample_dataset:
    input:
        model=f"{OUT}/models/{{dataset}}",
        index=f"{OUT}/embeddings/{{dataset}}/index.parquet",
    output:
        directory(f"{OUT}/samples/{{dataset}}"),
    params:
        pipeline=PIPELINE,
        embeddings=lambda w, input: str(Path(input.index).parent),
        spec=lambda w: DATASETS[w.dataset].to_json(),
        settings=json.dumps(config["sampling"], sort_keys=True),
        seed=config["seed"],
    log:
        f"{OUT}/logs/sample/{{dataset}}.log",
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=1,
    shell:
        "OMP_NUM_THREADS={threads} {params.pipeline} sample --model {input.model:q} "
        "--embeddings {params.embeddings:q} --spec {params.spec:q} --settings {params.settings:q} "
        "--seed {params.seed} --out {output:q} > {log:q} 2>&1"


rule sample:
    input:
        expand(f"{OUT}/samples/{{dataset}}", dataset=EMBEDDED_DATASETS),
