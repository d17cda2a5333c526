"""Pictures for people: training curves, annotated predictions, confusion matrices, attention rollout.

Uses matplotlib's non-interactive Agg backend and Pillow; nothing here is needed to train or infer.
"""
from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")  # headless: write files, never open windows

logger = logging.getLogger(__name__)
