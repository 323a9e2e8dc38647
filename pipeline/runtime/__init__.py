"""The shared runtime every stage may use: DeepSpeed compatibility patches, distributed helpers, logging.

It sits below the stages (train, evaluate, merge) and above only the leaf utilities (pipeline.errors,
pipeline.io), so that no stage has to import another stage to run on several ranks.
"""
