"""Warehouse: the sensor-driven load of raw batches, the rollups, the load job."""
