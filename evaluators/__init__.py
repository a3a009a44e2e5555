"""Task scorers (MGSM, lm-eval tasks, VQA, perplexity) that turn a materialized model into metrics.

They land with the evaluators issue (issue 4); the engine core hands them an in-memory model.
"""
