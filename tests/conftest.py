"""Test-session settings: offline Flower, a private FLWR_HOME, quiet Ray."""

from __future__ import annotations

import os
import tempfile

# Set before flwr / ray are imported by any test module.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
if "FLWR_HOME" not in os.environ:
    # A private Flower home, removed when the test process ends (one per pytest process).
    _FLWR_HOME = tempfile.TemporaryDirectory(prefix="fl-sparse-flwr-home-")
    os.environ["FLWR_HOME"] = _FLWR_HOME.name

import sys

# tests/ has no __init__.py: make its helper modules (inprocess.py) importable by name.
sys.path.insert(0, os.path.dirname(__file__))
