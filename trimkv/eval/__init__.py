"""Evaluation: synthetic long-context tasks (``trimkv.eval.tasks``) and their scoring."""
from trimkv.eval.tasks import TASK_METRIC, TASKS, Sample, make_samples, render_prompt, score

__all__ = ["TASKS", "TASK_METRIC", "Sample", "make_samples", "render_prompt", "score"]
