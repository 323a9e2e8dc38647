"""Shared test data for the recipe tests."""

# A valid minimal recipe: 4 lines, so text appended to it starts on line 5.
BASE = "model_name_or_path: tiny\ndataset: alpaca_demo\nnum_train_epochs: 3\ncutoff_len: 64\n"
