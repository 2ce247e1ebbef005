"""
twistd plugin for hsu-registry.  It imports nothing heavy: twistd imports
L{hsu_registry.tap} only when it runs the plugin.
"""

from twisted.application.service import ServiceMaker

hsuRegistry = ServiceMaker(
    "hsu-registry",
    "hsu_registry.tap",
    "A service registry: modules publish and discover API endpoints.",
    "hsu-registry",
)
