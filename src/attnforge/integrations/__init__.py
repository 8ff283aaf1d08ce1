"""Integrations with inference libraries (transformers; mlx-lm later). Each imports its library on import."""
