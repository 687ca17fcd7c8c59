# Whole synthetic slides: one job per slide that `synthesize_slide.slides` selects (slide datasets
# only; aerial regions get GeoTIFFs from the large-image stage), each the slide's whole embedding
# grid rendered at the dataset's um/px. Bands in progress are kept in
# OUT/synthetic/<dataset>/.<input id>.work/ (not a declared output, so a killed job keeps them and
# a re-run resumes at the first unfinished band); slide.json, written with the folder, marks a
# finished slide.


rule synthesize_slide:
    input:
        model=f"{OUT}/models/{{dataset}}",
        index=f"{OUT}/embeddings/{{dataset}}/index.parquet",
    output:
        f"{OUT}/synthetic/{{dataset}}/{{input_id}}/slide.json",
    params:
        pipeline=PIPELINE,
        embeddings=lambda w, input: str(Path(input.index).parent),
        out_dir=lambda w, output: str(Path(output[0]).parent),
        mpp=lambda w: DATASETS[w.dataset].target_mpp,
        settings=json.dumps(config["synthesize_slide"], sort_keys=True),
        seed=config["seed"],
    log:
        f"{OUT}/logs/synthesize/{{dataset}}/{{input_id}}.log",
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=32000,
        runtime=1440,
        gpu=1,
    shell:
        # Progress lines (windows done / total, ETA) go to stderr: the log.
        "OMP_NUM_THREADS={threads} {params.pipeline} synthesize-slide --model {input.model:q} "
        "--embeddings {params.embeddings:q} --input-id {wildcards.input_id} --dataset {wildcards.dataset} "
        "--mpp {params.mpp} --settings {params.settings:q} --seed {params.seed} --out {params.out_dir:q} "
        "> {log:q} 2>&1"


rule synthesize:
    input:
        synthesize_targets,
