"""Utilities shared by training, evaluation and inference (nothing here imports the engine or deploy)."""
