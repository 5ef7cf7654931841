"""The run's report pages: learning curves, a caption gallery, attention maps and tables.

Rendered headlessly (matplotlib's Agg backend, HTML with embedded images) by the rules of
rules/report.smk, which tag them for `snakemake --report`.
"""

# Registry names of the models with attention over image regions
# (`CaptionModel.attention_layer()` is not None; tests/unit/test_report.py checks that the
# two agree). Light to import: the rules decide which experiments get attention maps.
ATTENTION_MODELS = ("show_attend_tell", "transformer", "expansionnet_v2", "aoanet")
