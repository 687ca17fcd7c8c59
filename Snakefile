# Representation-guided latent diffusion for large images: the whole pipeline.
#   snakemake --cores N            every stage, report assets included
#   snakemake --cores N tile       one stage (targets: tile, stain, embed, autoencoder, latents, train,
#                                  prior, sample, large_image, generate, synthesize, evaluate, report,
#                                  viewer)
#   snakemake --report report.html the report: one self-contained HTML file (after the run)
#   results/viewer/index.html      the deep-zoom viewer of the large images (open it in a browser)
# Configuration: validated against pipeline/schemas/workflow_config.schema.yaml, which holds every
# default. workflow_config.yaml is the demo; `--configfile my.yaml` replaces it (it is not merged
# into the demo), `--config key=value` changes single keys of whichever is used.
from snakemake.utils import min_version

min_version("9.0")


if not workflow.config_settings.configfiles:

    configfile: f"{workflow.basedir}/workflow_config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"


wildcard_constraints:
    dataset="[A-Za-z0-9_-]+",
    input_id="[A-Za-z0-9_-]+",


include: "rules/tile.smk"
include: "rules/stain.smk"
include: "rules/embed.smk"
include: "rules/autoencoder.smk"
include: "rules/latents.smk"
include: "rules/train.smk"
include: "rules/prior.smk"
include: "rules/sample.smk"
include: "rules/large_image.smk"
include: "rules/generate.smk"
include: "rules/synthesize.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"
include: "rules/viewer.smk"


rule all:
    default_target: True
    input:
        rules.tile.input,
        rules.stain.input,
        rules.embed.input,
        rules.train.input,
        rules.sample.input,
        rules.large_image.input,
        rules.generate.input,
        synthesize_targets,  # checkpoint-dependent: the function itself
        rules.evaluate.input,
        rules.report.input,
        rules.viewer.input,
