"""Thin utilities shared by every chapter: data, device, CLI config, metrics and plots.

Teaching code never lives here; each chapter's model and training loop are in its own folder.
"""
