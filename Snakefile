# medprep: preprocessing of lung CT series and whole-slide images for deep learning.
#
#   download -> preprocess_{ct,wsi} -> tile_{ct,wsi} -> upload   (one chain per sample)
#
# Run: snakemake --cores all   (see README.md; cluster: --profile profiles/slurm)


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/preprocess.smk"
include: "rules/tile.smk"
include: "rules/upload.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),
