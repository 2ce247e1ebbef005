"""
The operator files in etc/ stay in step with the options they use.
"""

from __future__ import annotations

import os
import shlex

from twisted.trial.unittest import SynchronousTestCase

from hsu_registry.options import Options

ETC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")


class EtcTests(SynchronousTestCase):
    def read(self, *path: str) -> str:
        with open(os.path.join(ETC, *path), encoding="utf-8") as f:
            return f.read()

    def test_unit_runs_twistd_on_unix_socket(self) -> None:
        """The unit runs twistd -n hsu-registry with options the plugin accepts."""
        unit = self.read("systemd", "hsu-registry.service")
        (exec_start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
        argv = shlex.split(exec_start[len("ExecStart=") :])
        self.assertIn("--nodaemon", argv)
        self.assertIn("StateDirectory=hsu", unit)
        self.assertIn("LimitNOFILE=65536", unit)  # pidfds of process-bound modules
        plugin_args = [a for a in argv[argv.index("hsu-registry") + 1 :] if not a.startswith("$")]
        self.assertIn("--store=sqlite:/var/lib/hsu/registry.db", plugin_args)
        # /var/lib/hsu is the unit's state directory: stand a temporary one in.
        state = self.mktemp()
        os.makedirs(state)
        plugin_args = [a.replace("/var/lib/hsu", state) for a in plugin_args]
        options = Options()
        options.parseOptions(plugin_args)
        self.assertEqual(options.config.endpoints, ("unix:/run/hsu/registry.sock:mode=660",))
        self.assertEqual(options.config.store, f"sqlite:{state}/registry.db")

    def test_default_options_parse(self) -> None:
        """The example options in etc/default parse."""
        text = self.read("default", "hsu-registry")
        (line,) = [x for x in text.splitlines() if x.startswith("HSU_REGISTRY_OPTS=")]
        options = Options()
        options.parseOptions(shlex.split(shlex.split(line.split("=", 1)[1])[0]))
        self.assertEqual(options.config.stale_after, 300.0)
