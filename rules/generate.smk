# Stage 6b: reference-free large images. One job per dataset: `generate.count` images, each from a
# grid the dataset's prior samples, rendered by its diffusion model. Image folders are written
# atomically and reused by a re-run with the same settings; the manifest, written last, is the
# declared output.


rule generate_dataset:
    input:
        model=f"{OUT}/models/{{dataset}}",
        prior=f"{OUT}/prior/{{dataset}}/prior.json",
    output:
        f"{OUT}/generated/{{dataset}}/manifest.parquet",
    params:
        pipeline=PIPELINE,
        prior=lambda w, input: str(Path(input.prior).parent),
        out_dir=lambda w, output: str(Path(output[0]).parent),
        spec=lambda w: DATASETS[w.dataset].to_json(),
        settings=json.dumps(config["generate"], sort_keys=True),
        seed=config["seed"],
    log:
        f"{OUT}/logs/generate/{{dataset}}.log",
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=32000,
        runtime=720,
        gpu=1,
    shell:
        "OMP_NUM_THREADS={threads} {params.pipeline} generate --model {input.model:q} --prior {params.prior:q} "
        "--spec {params.spec:q} --settings {params.settings:q} --seed {params.seed} --out {params.out_dir:q} "
        "> {log:q} 2>&1"


rule generate:
    input:
        expand(f"{OUT}/generated/{{dataset}}/manifest.parquet", dataset=EMBEDDED_DATASETS),
