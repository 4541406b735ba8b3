"""Device health: the rules as asset checks, on their own schedule."""
