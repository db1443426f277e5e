"""Every docstring example in pymeta runs and prints what it shows."""
import doctest
import importlib
import pkgutil

import pytest

import pymeta

MODULES = sorted(m.name for m in pkgutil.walk_packages(pymeta.__path__, "pymeta.")
                 if not m.name.endswith("__main__"))


def test_public_modules_are_found():
    assert {"pymeta.ops.sgd_step", "pymeta.learners.maml", "pymeta.data.omniglot"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
