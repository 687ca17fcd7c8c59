# Stage 3: first-stage latents, once per patch. One job per embedded input. As in the embedding
# stage, the declared output is the manifest, written last; finished shards survive a kill.


rule latents_input:
    input:
        embeddings=f"{OUT}/embeddings/{{dataset}}/inputs/{{input_id}}/manifest.parquet",
        autoencoder=autoencoder_input(),
    output:
        f"{OUT}/latents/{{dataset}}/inputs/{{input_id}}/manifest.parquet",
    params:
        pipeline=PIPELINE,
        embeddings=lambda w, input: str(Path(input.embeddings).parent),
        out_dir=lambda w, output: str(Path(output[0]).parent),
        settings=json.dumps({**config["latents"], "autoencoder": AUTOENCODER}, sort_keys=True),
    log:
        f"{OUT}/logs/latents/{{dataset}}/{{input_id}}.log",
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=1,
    shell:
        "{params.pipeline} encode-latents --embeddings {params.embeddings:q} --out {params.out_dir:q} "
        "--settings {params.settings:q} > {log:q} 2>&1"


rule latents:
    input:
        lambda w: [
            f"{OUT}/latents/{dataset}/inputs/{input_id}/manifest.parquet"
            for dataset in EMBEDDED_DATASETS
            for input_id in training_inputs(dataset)  # held-out inputs are never trained on
        ],
