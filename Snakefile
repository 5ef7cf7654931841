# captionflow: image captioning as a Snakemake DAG. This file is the index; stages live
# in rules/*.smk, their code in workflow_scripts/ (one per rule) and the captionflow library.
#
#   snakemake --cores all              everything in config.yaml (the demo where there is none)
#   snakemake --cores all train_scst   one stage, for every experiment that has it, and what it needs
#   snakemake --cores 1 prefetch       what this config's jobs would download, for offline nodes
# profiles/default beside this file is Snakemake's workflow profile: found without --profile.
import os
import sys

from snakemake.utils import min_version

min_version("9.0")


# The run's config, one source of three: the files given with `--configfile` (a preset is
# a complete config: nothing else is merged under it), else config.yaml in the working
# directory (`--directory`), else the demo config beside this file. Jobs submitted to a
# cluster start in the same working directory with the same arguments, so they read the
# same files.
DEMO_CONFIG = os.path.join(workflow.basedir, "config.yaml")
CONFIG_FILES = [str(f) for f in workflow.config_settings.configfiles]
if not CONFIG_FILES:
    CONFIG = "config.yaml" if os.path.exists("config.yaml") else DEMO_CONFIG

    configfile: CONFIG


# `snakemake --report report.html`: this page first, then the items rules/report.smk tags.
report: "report/workflow.rst"


if workflow.is_main_process:
    if CONFIG_FILES:
        print(
            "captionflow: config from --configfile "
            + " + ".join(os.path.abspath(f) for f in CONFIG_FILES)
            + " (nothing else merged: no config.yaml, no demo)",
            file=sys.stderr,
        )
    elif CONFIG == DEMO_CONFIG:
        print(
            f"captionflow: no config.yaml in {os.getcwd()}: running the embedded demo "
            f"({DEMO_CONFIG}); put a config.yaml there to run your own",
            file=sys.stderr,
        )
    else:
        print(f"captionflow: config {os.path.abspath(CONFIG)}", file=sys.stderr)


# The config: validated against captionflow/config.schema.yaml (defaults filled), read into the
# run's values, checked across keys. Then the rules' helpers (rules/common/, one concern a
# file) and the rules (one stage family a file).
include: "rules/common/config_checks.smk"


validate_config(config)


include: "rules/common/config_values.smk"


check_config()


include: "rules/common/paths.smk"
include: "rules/common/stages.smk"
include: "rules/common/inputs.smk"
include: "rules/common/params.smk"
include: "rules/common/resources.smk"
include: "rules/common/preflight.smk"
include: "rules/common/summary.smk"
include: "rules/data.smk"
include: "rules/features.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/export.smk"
include: "rules/ensemble.smk"
include: "rules/prefetch.smk"
include: "rules/report.smk"
include: "rules/targets.smk"


rule all:
    default_target: True
    input:
        list(FEATURE_FILES.values()),
        METRICS_FILES,
        ENSEMBLE_METRICS,
        EXPORT_FILES,
        RETRIEVAL_METRICS,
        REPORT_FILES,
    localrule: True
