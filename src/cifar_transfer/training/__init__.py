"""Fitting a model: the run over phases, the loop, the probe, optimizers, plans, budgets, feature caches."""
