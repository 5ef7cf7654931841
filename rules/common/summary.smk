# The end of a successful run: each experiment's and ensemble's test metrics and the files
# behind them, the retrieval models' figures, and each bundle with its checkpoints.
import json
import os
import sys


def print_summary():
    """At the end of a successful run: each experiment's test metrics and its files."""
    from captionflow.metrics.summary import format_bundles, format_summary

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
        for name in EXPERIMENTS
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
    for name in RETRIEVAL_EXPERIMENTS:
        path = stage_metrics_file(name, "retrieval")
        if os.path.exists(path):
            with open(path) as f:
                r = json.load(f)
            t2i, i2t = r["text_to_image"], r["image_to_text"]
            print(
                f"\n{name} retrieval ({r['model']}, test): text-to-image R@1 {t2i['R@1']:.1f} "
                f"R@5 {t2i['R@5']:.1f} R@10 {t2i['R@10']:.1f} mAP {t2i['mAP']:.1f}; "
                f"image-to-text R@1 {i2t['R@1']:.1f} ({path})",
                file=sys.stderr,
            )
    # each bundle and the checkpoints it was made from (export_inputs, ensemble_bundles)
    bundles = {
        **{
            bundle_file(name): [model_file(name, last_stage(name))]
            for name in EXPERIMENTS
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
