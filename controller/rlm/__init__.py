"""The RLM loop: a run, its sub-calls, prompts, folding, events and trajectory."""
