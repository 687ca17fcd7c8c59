# The deep-zoom viewer: a static site, OUT/viewer/index.html, that opens from the file system
# (offline): one page per large image with the generated image and its real reference in two
# synchronised OpenSeadragon viewers, a scale bar and the region's provenance; an index of
# thumbnails. `pipeline viewer` (pipeline/viewer/) writes Deep Zoom tiles from the large-image
# stage's pyramidal TIFFs; the first build installs OpenSeadragon with `npm ci` (package.json and
# package-lock.json at the repository's root) into node_modules/, and every build copies it in.


rule viewer_site:
    input:
        expand(f"{OUT}/large_images/{{dataset}}/manifest.parquet", dataset=EMBEDDED_DATASETS),
    output:
        f"{OUT}/viewer/index.html",
    params:
        pipeline=PIPELINE,
        results=lambda w, output: str(Path(output[0]).parents[1]),
        out_dir=lambda w, output: str(Path(output[0]).parent),
        datasets=" ".join(f"--dataset {shlex.quote(name)}" for name in EMBEDDED_DATASETS),
        settings=json.dumps(config["viewer"], sort_keys=True),
    log:
        f"{OUT}/logs/viewer.log",
    conda:
        "../envs/viewer.yaml"
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "{params.pipeline} viewer {params.results:q} --out {params.out_dir:q} {params.datasets} "
        "--settings {params.settings:q} > {log:q} 2>&1"


rule viewer:
    input:
        [f"{OUT}/viewer/index.html"] if EMBEDDED_DATASETS else [],
