"""Clients of model servers shared by the model-backed stages (judge, grounder, rewriter)."""
