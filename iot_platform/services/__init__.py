"""Local service processes (PostgreSQL, Mosquitto) shared by the embedded stack and tests."""
