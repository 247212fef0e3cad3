"""Evaluation harness: batched scoring, item formats, conditions, statistics and the report."""
