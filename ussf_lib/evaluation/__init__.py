"""Evaluation: metrics, statistics, tables, reports and figures, read from run folders; never touches a model."""
