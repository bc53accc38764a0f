"""Preset files of ``fl-sparse reproduce`` (one TOML file per paper); read by :mod:`fl_sparse.simulations.reproduce`."""
