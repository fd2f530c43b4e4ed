"""Shared by the tests of the benchmark scripts: import a script of this folder as a module."""

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture
def load_bench():
    """``load_bench("bench_gpu")``: the script as a module, imported as when it runs as a script (this
    folder on ``sys.path``, since some scripts import others from it)."""

    def load(name: str):
        if str(HERE) not in sys.path:
            sys.path.insert(0, str(HERE))
        spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
