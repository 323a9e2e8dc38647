"""Evaluation stage: held-out loss/perplexity and generation metrics, base vs tuned, and a report."""
