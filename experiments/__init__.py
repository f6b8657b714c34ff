"""Experiments built on the mogan_ds package (each in its own folder, driven from the Makefile)."""
