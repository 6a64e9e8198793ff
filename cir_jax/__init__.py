"""cir_jax: composed image retrieval in JAX/Flax."""
