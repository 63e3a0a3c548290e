"""Evaluators of frozen representations, on arrays of features the trainer has already extracted.

Each evaluator is a module looked up by name in REGISTRY, with a `run(train_x, train_y, test_x, test_y,
num_classes, **kw) -> dict` entry that returns Python floats. Only the linear probe exists so far; few-shot,
k-NN and others come later under their own names.
"""
from xsample_jax.evals import linear_probe

REGISTRY = {"linear_probe": linear_probe}
