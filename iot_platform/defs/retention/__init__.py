"""Data lifecycle: the warehouse retention pass as an asset, on an hourly schedule."""
