"""xsample_jax: X-Sample Contrastive (X-CLR) pretraining in JAX/Flax.

Data flows one way: config -> data pipeline -> sharded train step -> losses -> optax -> checkpoint.
"""
