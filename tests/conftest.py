pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.ingest",
    "tests.fixtures.timescale",
    "tests.fixtures.stack",
]
