"""edgebill models package."""
