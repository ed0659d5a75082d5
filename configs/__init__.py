"""Experiment configs (ml_collections), one module per setting; see each module's docstring for its command."""
