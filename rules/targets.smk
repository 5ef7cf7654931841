# Stage targets: `snakemake <stage>` builds that stage for every experiment that has it,
# and only what it needs. Each stage's work runs as one job per experiment, in the rule
# `<stage>_job` (a rule with the {experiment} wildcard cannot be a target itself):
#   snakemake train_scst                              SCST of every experiment that has it
#   snakemake -R train_scst_job --until train_scst    rerun SCST everywhere, nothing after it
#   snakemake -R results/<experiment>/scst/model.pt   rerun one experiment's SCST


rule train_xe:
    input:
        stage_outputs("train_xe"),
    localrule: True


rule finetune_e2e:
    input:
        stage_outputs("finetune_e2e"),
    localrule: True


rule regenerate_features:
    input:
        stage_outputs("regenerate_features"),
    localrule: True


rule train_scst:
    input:
        stage_outputs("train_scst"),
    localrule: True


rule train_scst_e2e:
    input:
        stage_outputs("train_scst_e2e"),
    localrule: True


rule train_es:
    input:
        stage_outputs("train_es"),
    localrule: True


rule train_retrieval:
    input:
        stage_outputs("train_retrieval"),
    localrule: True


rule evaluate_retrieval:
    input:
        stage_outputs("evaluate_retrieval"),
    localrule: True


rule evaluate:
    input:
        stage_outputs("evaluate"),
    localrule: True


rule report_metrics:
    input:
        stage_outputs("report_metrics"),
    localrule: True


rule export_model:
    input:
        stage_outputs("export_model"),
    localrule: True


rule export_onnx:
    input:
        stage_outputs("export_onnx"),
    localrule: True


rule plot_experiment:
    input:
        stage_outputs("plot_experiment"),
    localrule: True


rule plot_attention:
    input:
        stage_outputs("plot_attention"),
    localrule: True
