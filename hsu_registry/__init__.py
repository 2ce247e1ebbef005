"""
hsu-registry: a service registry daemon on Twisted.

Modules publish the API endpoints they serve and discover each other's at run
time.  Importing this package is cheap and installs no reactor; the web layer
(which imports Klein, and so the default reactor) is imported only by
L{hsu_registry.service} and L{hsu_registry.web}.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
