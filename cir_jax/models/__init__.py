"""Image encoders, text encoders, composers and the retrieval model."""
