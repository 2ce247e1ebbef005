"""
The packaging lists every package of the source tree, so that what the tests
import from the checkout is also what ``pip install .`` installs.
"""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_packages() -> list[str]:
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "packages":
            value = ast.literal_eval(node.value)
            assert isinstance(value, list)
            return [str(name) for name in value]
    raise AssertionError("setup.py gives no packages=")


class PackagingTests(SynchronousTestCase):
    def test_every_package_is_installed(self) -> None:
        """Every directory of hsu_registry with an __init__.py is in setup.py's packages."""
        found = []
        for directory, _dirs, files in os.walk(os.path.join(ROOT, "hsu_registry")):
            if "__init__.py" in files:
                found.append(os.path.relpath(directory, ROOT).replace(os.sep, "."))
        listed = _setup_packages()
        self.assertEqual(sorted(p for p in listed if p.startswith("hsu_registry")), sorted(found))
        self.assertIn("twisted.plugins", listed)
