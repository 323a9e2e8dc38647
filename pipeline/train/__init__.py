"""The training stage: DeepSpeed engine, loop, schedules, checkpoints with exact resume, logs.

Entry point: `pipeline.train.run.run(r, args)` (`python -m pipeline train RECIPE`).
"""
