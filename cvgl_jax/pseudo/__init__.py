"""Pseudo labels: nearest neighbours and refinement."""
