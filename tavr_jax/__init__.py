"""TAVR visual guidance: grouped keypoints on aortography and fluoroscopy frames, in JAX."""

from tavr_jax.schema import DEFAULT_SCHEMA, KeypointSchema, get_schema

__all__ = ["DEFAULT_SCHEMA", "KeypointSchema", "get_schema"]
