# The end of a successful run: each experiment's and ensemble's test metrics and the files
# behind them, the retrieval models' figures, and each bundle with its checkpoints.
import sys


def print_summary():
    """At the end of a successful run: each captioning experiment's test metrics and its
    files, each retrieval model's figures (a retrieval-only experiment has only those), the
    bundles."""
    from captionflow.metrics.summary import (
        format_bundles,
        format_retrieval,
        format_summary,
    )

    experiments = {
        name: {
            s: {
                "metrics": stage_metrics_file(name, s),
                "checkpoint": model_file(name, s),
                "predictions": predictions_file(name, s),
                "log": f"logs/{TRAINING_STAGES[s]}/{name}.log",
            }
            for s in stages(name)
        }
        for name in CAPTIONING
    }
    for name, ensemble in ENSEMBLES.items():
        experiments[name] = {
            f"{m} {last_stage(m)}": experiments[m][last_stage(m)]
            for m in ensemble["members"]
        }
        experiments[name]["ensemble"] = {
            "metrics": stage_metrics_file(name, "ensemble"),
            "checkpoint": bundle_file(name),
            "predictions": predictions_file(name, "ensemble"),
            "log": f"logs/evaluate/{name}_ensemble.log",
        }
    for line in format_summary(experiments):
        print(line, file=sys.stderr)
    for line in format_retrieval(RETRIEVAL_TABLE):
        print(line, file=sys.stderr)
    # each bundle and the checkpoints it was made from (export_inputs, ensemble_bundles)
    bundles = {
        **{
            bundle_file(name): [model_file(name, last_stage(name))]
            for name in CAPTIONING
        },
        **{
            bundle_file(name): [
                model_file(m, last_stage(m)) for m in ensemble["members"]
            ]
            for name, ensemble in ENSEMBLES.items()
        },
    }
    for line in format_bundles(bundles):
        print(line, file=sys.stderr)


onsuccess:
    print_summary()
