import pytest


def pytest_collection_modifyitems(config, items):
    if config.pluginmanager.hasplugin("benchmark"):
        return
    skip = pytest.mark.skip(reason="pytest-benchmark is not installed (pip install 'fastpair[bench]')")
    for item in items:
        item.add_marker(skip)
