"""Recipe-driven fine-tuning of the book's GPT on DeepSpeed."""

__version__ = "0.1.0"
