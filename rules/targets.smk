# Stage targets: `snakemake <stage>` builds that stage for every experiment that has it,
# and only what it needs. Each stage's work runs as one job per experiment, in the rule
# `<stage>_job` (a rule with the {experiment} wildcard cannot be a target itself):
#   snakemake train_scst                              SCST of every experiment that has it
#   snakemake -R train_scst_job --until train_scst    rerun SCST everywhere, nothing after it
#   snakemake -R results/<experiment>/scst/model.pt   rerun one experiment's SCST
# One target rule per entry of STAGE_TARGETS (rules/common/stages.smk).

for _target in STAGE_TARGETS:

    rule:
        name:
            _target
        input:
            stage_outputs(_target),
        localrule: True
