"""Judging trained models: sampling and export, evaluation, metrics and feature extractors."""
