"""Experiment configs: `get_config(arg)` files for `python -m xsample_jax.main --config configs/NAME.py[:ARG]`."""
