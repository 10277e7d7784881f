"""Measurements of models: in-context checks of the reference model."""
