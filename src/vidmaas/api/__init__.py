"""The api role: REST, event streams, the web page, health and metrics."""
