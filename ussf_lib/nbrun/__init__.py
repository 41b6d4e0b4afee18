"""Notebook running: helpers the notebooks call, the papermill runner, and parameter sweeps."""
