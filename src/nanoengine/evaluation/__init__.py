"""Evaluation harnesses on nanoengine (optional extra `eval`): lm-evaluation-harness's `nanoengine` model."""
