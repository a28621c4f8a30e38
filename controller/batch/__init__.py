"""Batches of prompts: the runner, its input and output files, progress."""
