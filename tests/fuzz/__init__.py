"""Fuzzing the HTTP API against its own OpenAPI document."""
