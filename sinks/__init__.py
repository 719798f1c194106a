"""edgebill sinks package."""
