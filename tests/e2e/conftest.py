"""End-to-end runs of the training program (train, kill and resume, several processes, bad inputs): all `slow`."""

import pytest


def pytest_collection_modifyitems(config, items):
    del config
    for item in items:
        if "/e2e/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.slow)
