"""The data stage: registry -> sources -> Alpaca rows (build) -> checks -> templates -> tokens -> batches.

Modules, one job each: registry (dataset_info.json), sources (reading raw files with line numbers),
convert (records -> Alpaca rows / text documents), build (the `build` command), check (built files),
templates, tokenize (masks + length policy), inspect (the `inspect` command), loaders (batches), load
(built splits).
"""
