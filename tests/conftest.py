import pytest

pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.ingest",
    "tests.fixtures.timescale",
    "tests.fixtures.stack",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules marked ``long`` first, the rest in their order: the test workers
    (scripts/test.sh, one module per worker at a time) take the longest work first and
    finish together, instead of one worker starting a multi-minute module near the end."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
