"""Segmentation metrics and the `icnet-evaluate` program."""
