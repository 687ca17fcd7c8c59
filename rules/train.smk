# Stage 4: one latent diffusion model per dataset, conditioned on the dataset's first encoder.
# Checkpoints live in OUT/training/<dataset>/checkpoints/ (not declared outputs, so a killed job
# keeps them and a re-run continues from last.ckpt); `done.json` marks a finished run.


rule train_dataset:
    input:
        lambda w: expand(
            f"{OUT}/latents/{{dataset}}/inputs/{{input_id}}/manifest.parquet",
            dataset=w.dataset,
            input_id=training_inputs(w.dataset),
        ),
    output:
        f"{OUT}/training/{{dataset}}/done.json",
    params:
        pipeline=PIPELINE,
        run=lambda w, output: str(Path(output[0]).parent),
        embedding_key=lambda w: DATASETS[w.dataset].encoders[0],
        holdout_fraction=lambda w: DATASETS[w.dataset].holdout_fraction,
        settings=json.dumps(config["training"], sort_keys=True),
        seed=config["seed"],
    log:
        f"{OUT}/logs/train/{{dataset}}.log",
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=64000,
        runtime=2880,
        gpu=config["training"]["devices"],
    shell:
        # Progress lines (stdout) reach the console and the log; everything else only the log.
        ": > {log:q}; OMP_NUM_THREADS={threads} {params.pipeline} train --run {params.run:q} "
        "--embedding-key {params.embedding_key:q} --holdout-fraction {params.holdout_fraction} --seed {params.seed} "
        "--settings {params.settings:q} --done {output:q} {input:q} 2>> {log:q} | tee -a {log:q}"


rule export_model:
    input:
        done=f"{OUT}/training/{{dataset}}/done.json",
        autoencoder=autoencoder_input(),
    output:
        directory(f"{OUT}/models/{{dataset}}"),
    params:
        pipeline=PIPELINE,
        run=lambda w, input: str(Path(input.done).parent),
        autoencoder=json.dumps(AUTOENCODER, sort_keys=True),
    log:
        f"{OUT}/logs/train/{{dataset}}.export.log",
    conda:
        "../envs/torch.yaml"
    shell:
        "{params.pipeline} export-model --run {params.run:q} --autoencoder {params.autoencoder:q} "
        "--out {output:q} > {log:q} 2>&1"


rule train:
    input:
        expand(f"{OUT}/models/{{dataset}}", dataset=EMBEDDED_DATASETS),
