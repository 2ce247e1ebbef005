"""
Packaging for hsu-registry.  Everything (metadata, dependencies, the packages
list with twisted.plugins, package data, the version from
C{hsu_registry.__version__}) is in pyproject.toml; this file only lets tools
that still look for a setup.py find the project.
"""

from setuptools import setup

setup()
