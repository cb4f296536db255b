"""Stages of the complex-edit dataset factory: plain Python over `EditSample` records."""

__version__ = "0.1.0"
