"""
The HTTP face of the registry: the Klein routes (L{hsu_registry.web.api}) and
the Site that serves them with bounded request bodies
(L{hsu_registry.web.site}).  Importing this package imports Klein, which
installs the default reactor: embedders install theirs first.
"""
