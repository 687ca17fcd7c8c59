# Stage 2b: the first-stage autoencoder, trained on one dataset's tiled patches (held-out patches
# never trained on) for `latents.autoencoder: {kind: trained, dataset: <name>}`. Checkpoints live
# in OUT/autoencoder/<dataset>/checkpoints/ (not declared outputs, so a killed job keeps them and a
# re-run continues from last.ckpt); metrics.json, written after model/, marks a finished stage.


rule train_autoencoder:
    input:
        status=f"{OUT}/tiles/{{dataset}}/status.tsv",
    output:
        f"{OUT}/autoencoder/{{dataset}}/metrics.json",
    params:
        pipeline=PIPELINE,
        tiles=lambda w, input: str(Path(input.status).parent),
        out_dir=lambda w, output: str(Path(output[0]).parent),
        spec=lambda w: DATASETS[w.dataset].to_json(),
        settings=json.dumps(config["autoencoder"], sort_keys=True),
        seed=config["seed"],
    log:
        f"{OUT}/logs/autoencoder/{{dataset}}.log",
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=32000,
        runtime=1440,
        gpu=1,
    shell:
        # Progress lines (stdout) reach the console and the log; everything else only the log.
        ": > {log:q}; OMP_NUM_THREADS={threads} {params.pipeline} train-autoencoder --tiles {params.tiles:q} "
        "--spec {params.spec:q} --settings {params.settings:q} --seed {params.seed} --out {params.out_dir:q} "
        "2>> {log:q} | tee -a {log:q}"


rule autoencoder:
    input:
        expand(f"{OUT}/autoencoder/{{dataset}}/metrics.json", dataset=AUTOENCODER_DATASETS),
