"""
The packaging installs what the source tree holds and needs: pyproject.toml
lists every package of the tree (so that what the tests import from the
checkout is also what ``pip install .`` installs), declares every third-party
module the code imports, and takes the version from C{hsu_registry.__version__}
alone.  The systemd unit runs the twistd that its install commands (the
README's too) create, and C{systemd-analyze verify} finds nothing to say
about it.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

import hsu_registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # the test extra installs tomli there
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(ROOT, "etc", "systemd", "hsu-registry.service")

#: Top-level modules of this repository: not third-party.
FIRST_PARTY = frozenset({"hsu_registry", "tests", "bench"})

#: The distribution of an imported module, where it is not named like the
#: module's top-level package, or where several distributions share that
#: package (a namespace): the longest dotted prefix listed here wins.
DISTRIBUTIONS = {
    "attr": "attrs",
    "zope.interface": "zope.interface",
    "OpenSSL": "pyOpenSSL",
    "service_identity": "service-identity",
    "yaml": "PyYAML",
}


def _pyproject() -> dict[str, Any]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement(spec: str) -> tuple[str, list[str]]:
    """The normalized distribution name and the extras of a requirement string."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", spec)
    assert match is not None, spec
    extras = [e.strip() for e in (match.group(2) or "").split(",") if e.strip()]
    return _normalize(match.group(1)), extras


def _provided(specs: list[str]) -> set[str]:
    """
    The normalized names of the distributions that requirements C{specs} bring
    directly: their own, and those that their extras add (read from the
    installed metadata of the distribution with the extra, e.g. pyopenssl for
    twisted[tls]).
    """
    names = set()
    for spec in specs:
        name, extras = _requirement(spec)
        names.add(name)
        if not extras:
            continue
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for required in requires:
            marker = required.partition(";")[2]
            extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
            if extra is not None and extra.group(1) in extras:
                names.add(_requirement(required)[0])
    return names


def _is_type_checking(test: ast.expr) -> bool:
    """Whether an C{if} tests C{TYPE_CHECKING} (its body runs only under mypy)."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _runtime_imports(node: ast.AST) -> Iterator[str]:
    """The absolute module names imported at run time in C{node}'s tree."""
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        children: list[ast.AST] = list(node.orelse)
    else:
        children = list(ast.iter_child_nodes(node))
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        yield node.module
    for child in children:
        yield from _runtime_imports(child)


def _third_party_imports(*directories: str) -> dict[str, list[str]]:
    """
    The third-party modules imported at run time by the Python files under
    C{directories} (relative to the repository), each with the files that
    import it.
    """
    found: dict[str, list[str]] = {}
    for directory in directories:
        for path, _dirs, files in os.walk(os.path.join(ROOT, directory)):
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                filename = os.path.join(path, name)
                with open(filename, encoding="utf-8") as f:
                    tree = ast.parse(f.read(), filename)
                for module in _runtime_imports(tree):
                    top = module.split(".")[0]
                    if top in sys.stdlib_module_names or top in FIRST_PARTY:
                        continue
                    found.setdefault(module, []).append(os.path.relpath(filename, ROOT))
    return found


def _distribution(module: str) -> str:
    """The distribution that provides C{module} (see L{DISTRIBUTIONS})."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in DISTRIBUTIONS:
            return DISTRIBUTIONS[prefix]
    return parts[0]


class PackagesTests(SynchronousTestCase):
    """pyproject.toml installs every package of the tree, the plugin and py.typed."""

    def test_every_package_is_installed(self) -> None:
        """Every directory of hsu_registry with an __init__.py is in pyproject's packages."""
        found = []
        for directory, _dirs, files in os.walk(os.path.join(ROOT, "hsu_registry")):
            if "__init__.py" in files:
                found.append(os.path.relpath(directory, ROOT).replace(os.sep, "."))
        listed = _pyproject()["tool"]["setuptools"]["packages"]
        self.assertEqual(sorted(p for p in listed if p.startswith("hsu_registry")), sorted(found))
        self.assertIn("twisted.plugins", listed)

    def test_plugin_directory_is_no_package(self) -> None:
        """
        twisted/ and twisted/plugins/ have no __init__.py (they would hide
        Twisted's own package): twisted.plugins is installed because it is
        listed, not found.
        """
        self.assertTrue(
            os.path.isfile(os.path.join(ROOT, "twisted/plugins/hsu_registry_plugin.py"))
        )
        self.assertFalse(os.path.exists(os.path.join(ROOT, "twisted/__init__.py")))
        self.assertFalse(os.path.exists(os.path.join(ROOT, "twisted/plugins/__init__.py")))

    def test_py_typed_is_installed(self) -> None:
        """The PEP 561 marker is package data of hsu_registry, and exists."""
        data = _pyproject()["tool"]["setuptools"]["package-data"]
        self.assertIn("py.typed", data["hsu_registry"])
        self.assertTrue(os.path.isfile(os.path.join(ROOT, "hsu_registry", "py.typed")))

    def test_setup_py_says_nothing(self) -> None:
        """setup.py calls setup() without arguments: pyproject.toml says it all."""
        with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        calls = [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "setup"
        ]
        self.assertEqual(len(calls), 1)
        self.assertEqual((calls[0].args, calls[0].keywords), ([], []))

    def test_scripts_resolve(self) -> None:
        """Every console script of pyproject names a callable of the package."""
        scripts = _pyproject()["project"]["scripts"]
        self.assertEqual(set(scripts), {"hsu-registry", "hsu-registry-ctl"})
        for target in scripts.values():
            module, _, attribute = target.partition(":")
            self.assertTrue(callable(getattr(importlib.import_module(module), attribute)), target)


class DependenciesTests(SynchronousTestCase):
    """Every third-party module the code imports is declared."""

    def assertDeclared(self, imports: dict[str, list[str]], specs: list[str]) -> None:
        """
        Every module of C{imports} comes from a distribution that the
        requirements C{specs} bring, and L{DISTRIBUTIONS} names that
        distribution rightly where it is installed.
        """
        provided = _provided(specs)
        installed = importlib.metadata.packages_distributions()
        for module, files in sorted(imports.items()):
            distribution = _distribution(module)
            self.assertIn(
                _normalize(distribution),
                provided,
                f"{module} (distribution {distribution}, imported by {', '.join(files)})"
                f" is not declared in pyproject.toml",
            )
            top = module.split(".")[0]
            if top in installed:
                self.assertIn(
                    _normalize(distribution),
                    {_normalize(name) for name in installed[top]},
                    f"{module} is installed from {installed[top]}, not {distribution}:"
                    " map it in DISTRIBUTIONS",
                )

    def test_package_imports_are_dependencies(self) -> None:
        """
        Every third-party module that hsu_registry/ and twisted/plugins/
        import at run time (not under C{if TYPE_CHECKING}) comes from a
        distribution in pyproject's dependencies.
        """
        imports = _third_party_imports("hsu_registry", os.path.join("twisted", "plugins"))
        for module in ("attrs", "klein", "twisted", "werkzeug", "zope.interface"):
            self.assertTrue(any(m.split(".")[0] == module.split(".")[0] for m in imports), module)
        self.assertDeclared(imports, _pyproject()["project"]["dependencies"])

    def test_test_imports_are_test_dependencies(self) -> None:
        """The third-party modules of tests/ are dependencies or in the test extra."""
        project = _pyproject()["project"]
        specs = project["dependencies"] + project["optional-dependencies"]["test"]
        self.assertDeclared(_third_party_imports("tests"), specs)

    def test_undeclared_import_is_caught(self) -> None:
        """The check fails for a module that no declared distribution brings."""
        with self.assertRaises(self.failureException) as caught:
            self.assertDeclared({"werkzeug.exceptions": ["x.py"]}, ["twisted[tls]", "klein"])
        self.assertIn("werkzeug.exceptions", str(caught.exception))
        # Distributions brought by an extra count: twisted[tls] brings pyOpenSSL.
        try:
            importlib.metadata.version("twisted")
        except importlib.metadata.PackageNotFoundError:
            raise SkipTest("Twisted's metadata is not installed") from None
        self.assertIn("pyopenssl", _provided(["twisted[tls]>=24.7"]))
        self.assertNotIn("pyopenssl", _provided(["twisted>=24.7"]))


class VersionTests(SynchronousTestCase):
    """The version is written once, as C{hsu_registry.__version__}."""

    def test_pyproject_reads_version_from_package(self) -> None:
        """pyproject.toml has no literal version: setuptools reads __version__."""
        pyproject = _pyproject()
        self.assertNotIn("version", pyproject["project"])
        self.assertIn("version", pyproject["project"]["dynamic"])
        self.assertEqual(
            pyproject["tool"]["setuptools"]["dynamic"]["version"],
            {"attr": "hsu_registry.__version__"},
        )

    def test_installed_version_is_package_version(self) -> None:
        """The installed distribution's version is hsu_registry.__version__."""
        try:
            installed = importlib.metadata.version("hsu-registry")
        except importlib.metadata.PackageNotFoundError:
            raise SkipTest(
                "hsu-registry is not installed (tests run from a bare checkout)"
            ) from None
        self.assertEqual(installed, hsu_registry.__version__)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _install_commands(unit: str) -> list[str]:
    """The commands of the unit's header comment under "# Install"."""
    commands: list[str] = []
    in_install = False
    for line in unit.splitlines():
        if line.startswith("# Install"):
            in_install = True
        elif in_install and line.startswith("#   "):
            commands.append(line[len("#   ") :])
        elif in_install and commands:
            break
    return commands


def _exec_start(unit: str) -> str:
    """The program that the unit's (one) ExecStart= runs."""
    (line,) = [x for x in unit.splitlines() if x.startswith("ExecStart=")]
    return shlex.split(line[len("ExecStart=") :])[0]


class SystemdUnitTests(SynchronousTestCase):
    """
    etc/systemd/hsu-registry.service runs the twistd that its install commands
    create, and systemd-analyze verify accepts it.
    """

    def install_venv(self, commands: list[str]) -> str:
        """
        The venv that install commands C{commands} create and install this
        project into: C{python3 -m venv DIR}, then C{DIR/bin/pip install .}.
        """
        venvs = [m.group(1) for c in commands if (m := re.fullmatch(r"python3 -m venv (\S+)", c))]
        if len(venvs) != 1:
            self.fail(f"no single 'python3 -m venv DIR' in the install commands {commands}")
        (venv,) = venvs
        pip = f"{venv}/bin/pip install ."
        if pip not in commands or commands.index(pip) < commands.index(f"python3 -m venv {venv}"):
            self.fail(f"no {pip!r} after the venv is made in {commands}")
        return venv

    def stand_in(self, unit: str, venv: str, prefix: str) -> str:
        """
        C{unit} with only the program of its ExecStart= moved from the venv
        C{venv} to the same place under C{prefix}.
        """
        program = _exec_start(unit)
        if not program.startswith(venv + "/"):
            self.fail(f"ExecStart= runs {program}, which is not in the venv {venv}")
        moved = prefix + program[len(venv) :]
        old = f"\nExecStart={program} "
        self.assertEqual(unit.count(old), 1)
        return unit.replace(old, f"\nExecStart={moved} ")

    def verify(self, unit: str) -> list[str]:
        """
        What C{systemd-analyze verify} says about C{unit}, written as
        hsu-registry.service to a temporary directory: its exit status when
        not 0, and every line of its output but those about other units'
        files (the system's own units that the unit pulls in).  Many errors
        of a unit file ("Missing '='", "Unknown key", unparsable values) are
        only logged, "ignoring" the line, with exit status 0: any line counts.
        """
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed: the unit is not verified")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "hsu-registry.service")
        with open(path, "w", encoding="utf-8") as f:
            f.write(unit)
        result = subprocess.run(
            [analyze, "verify", path],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
        )
        said = []
        for line in (result.stdout + result.stderr).splitlines():
            about = re.match(r"(/\S+?):\d+: ", line)
            other = about is not None and (
                os.path.exists(about.group(1)) and not os.path.samefile(about.group(1), path)
            )
            if line.strip() and not other:
                said.append(line)
        if result.returncode != 0:
            said.append(f"exit status {result.returncode}")
        return said

    def running_venv(self) -> str:
        """
        The venv these tests run in: made, like the unit's, by C{python3 -m
        venv} and a pip install of this project, so it stands in for it.
        """
        if sys.prefix == sys.base_prefix:
            raise SkipTest("the tests do not run in a venv: nothing stands in for the unit's")
        if not os.access(os.path.join(sys.prefix, "bin", "twistd"), os.X_OK):
            raise SkipTest(f"no twistd in {sys.prefix}/bin: Twisted is installed elsewhere")
        return sys.prefix

    def test_unit_runs_twistd_of_install_venv(self) -> None:
        """
        The unit's install commands make a venv and pip install the project
        into it, and ExecStart= runs the twistd script that this creates.
        """
        unit = _read(UNIT)
        venv = self.install_venv(_install_commands(unit))
        self.assertEqual(venv, "/opt/hsu-registry")
        self.assertEqual(_exec_start(unit), f"{venv}/bin/twistd")

    def test_readme_gives_unit_install_commands(self) -> None:
        """README.rst gives the same install commands as the unit, in one block."""
        commands = _install_commands(_read(UNIT))
        self.assertTrue(commands)
        block = "".join(f"    {command}\n" for command in commands)
        self.assertIn("::\n\n" + block + "\n", _read(os.path.join(ROOT, "README.rst")))

    def test_unit_verifies(self) -> None:
        """
        systemd-analyze verify says nothing about the unit, its twistd taken
        from the venv the tests run in instead of the install's venv (which
        this machine need not have).  User=hsu need not exist: verify does
        not look the user up.
        """
        venv = self.running_venv()
        unit = _read(UNIT)
        stand_in = self.stand_in(unit, self.install_venv(_install_commands(unit)), venv)
        self.assertIn(f"\nExecStart={venv}/bin/twistd --nodaemon ", stand_in)
        self.assertEqual(self.verify(stand_in), [])

    def test_verify_catches_errors(self) -> None:
        """
        The verification fails for a unit with a syntax error (which verify
        only logs, exit status 0), for a twistd that is not installed, and
        for a unit whose twistd is not in the install's venv.
        """
        venv = self.running_venv()
        unit = _read(UNIT)
        install = self.install_venv(_install_commands(unit))
        stand_in = self.stand_in(unit, install, venv)
        broken = stand_in.replace("\nRestart=on-failure\n", "\nRestart on-failure\n")
        self.assertNotEqual(broken, stand_in)
        self.assertIn("Missing '='", "\n".join(self.verify(broken)))
        missing = self.stand_in(unit, install, os.path.abspath(self.mktemp()))
        self.assertIn("is not executable", "\n".join(self.verify(missing)))
        elsewhere = unit.replace(
            f"ExecStart={install}/bin/twistd ", "ExecStart=/usr/local/bin/twistd "
        )
        self.assertNotEqual(elsewhere, unit)
        self.assertRaises(self.failureException, self.stand_in, elsewhere, install, venv)
