"""edgebill streams package."""
