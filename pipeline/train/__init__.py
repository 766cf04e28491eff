"""Training: the loop, its optimizer and schedule, token batches from the shards, checkpoints and data parallelism.

``checkpoint.load_model(train_dir)`` is what later stages use to get a trained model back.
"""
