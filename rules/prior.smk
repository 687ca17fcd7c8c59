# Stage 4b: the embedding-grid prior, one per dataset, trained on the dataset's embedding grids
# (held-out inputs never trained on). Checkpoints live in OUT/prior/<dataset>/checkpoints/ (not
# declared outputs, so a killed job keeps them and a re-run continues from last.ckpt); prior.json,
# written after model/, marks a finished stage.


rule train_prior:
    input:
        index=f"{OUT}/embeddings/{{dataset}}/index.parquet",
    output:
        f"{OUT}/prior/{{dataset}}/prior.json",
    params:
        pipeline=PIPELINE,
        embeddings=lambda w, input: str(Path(input.index).parent),
        out_dir=lambda w, output: str(Path(output[0]).parent),
        spec=lambda w: DATASETS[w.dataset].to_json(),
        settings=json.dumps(config["prior"], sort_keys=True),
        seed=config["seed"],
    log:
        f"{OUT}/logs/prior/{{dataset}}.log",
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=720,
        gpu=1,
    shell:
        # Progress lines (stdout) reach the console and the log; everything else only the log.
        ": > {log:q}; OMP_NUM_THREADS={threads} {params.pipeline} train-prior --embeddings {params.embeddings:q} "
        "--spec {params.spec:q} --settings {params.settings:q} --seed {params.seed} --out {params.out_dir:q} "
        "2>> {log:q} | tee -a {log:q}"


rule prior:
    input:
        expand(f"{OUT}/prior/{{dataset}}/prior.json", dataset=EMBEDDED_DATASETS),
