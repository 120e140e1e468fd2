"""pytest settings: the `gpu` marker (tests that need CUDA; skipped where there is none, so CI on a CPU skips them)."""
import pytest, torch


def pytest_configure(config):
    config.addinivalue_line('markers', 'gpu: needs a CUDA GPU; skipped without one (run with: pytest -m gpu)')


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason='no CUDA GPU here (these run on a CUDA machine: pytest -m gpu)')
    for item in items:
        if 'gpu' in item.keywords: item.add_marker(skip)
