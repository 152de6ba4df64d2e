"""Backbone families and their weights, the transfer model (backbone + head, freezing), the one batched-logits path."""
