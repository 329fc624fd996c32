"""Weights: HF loading, the name table, ParamSpec and validation."""
