# Representation-guided latent diffusion for large images: the whole pipeline.
#   snakemake --cores N            every stage that exists
#   snakemake --cores N tile       one stage (targets: tile, embed, latents, train, sample, large_image)
# Configuration: workflow_config.yaml, validated against pipeline/schemas/workflow_config.schema.yaml.
from snakemake.utils import min_version

min_version("9.0")


configfile: "workflow_config.yaml"


include: "rules/common.smk"


wildcard_constraints:
    dataset="[A-Za-z0-9_-]+",
    input_id="[A-Za-z0-9_-]+",


include: "rules/tile.smk"
include: "rules/embed.smk"
include: "rules/latents.smk"
include: "rules/train.smk"
include: "rules/sample.smk"
include: "rules/large_image.smk"


rule all:
    default_target: True
    input:
        rules.tile.input,
        rules.embed.input,
        rules.train.input,
        rules.sample.input,
        rules.large_image.input,
