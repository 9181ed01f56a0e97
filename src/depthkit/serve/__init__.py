"""Serving: an OpenAI-compatible HTTP server with continuous (and depth-wise) batching."""
