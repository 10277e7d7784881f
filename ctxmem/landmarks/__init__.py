"""Landmarks: compressed key/value summaries of evicted chunks, built, selected and injected."""
