"""Hydra configuration groups and recipes of qsparse (package data, on Hydra's search path)."""
