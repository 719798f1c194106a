"""edgebill infra package."""
