"""Packaging for hsu-registry: the package, its twistd plugin and its commands."""

from setuptools import setup

setup(
    name="hsu-registry",
    version="0.1.0",
    description="A service registry daemon on Twisted: modules publish and discover API endpoints.",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.10",
    packages=[
        "hsu_registry",
        "hsu_registry.checks",
        "hsu_registry.client",
        "hsu_registry.processes",
        "hsu_registry.stores",
        "hsu_registry.web",
        "twisted.plugins",
    ],
    package_data={"hsu_registry": ["py.typed"]},
    install_requires=[
        "twisted[tls]>=24.7",
        "klein>=23.5",
        "zope.interface>=5",
        "attrs>=22.2",
    ],
    extras_require={
        "test": [
            "treq>=23.11",
            "hypothesis>=6.80",
            "ruff>=0.5",
            "mypy>=1.10",
            "mypy-zope>=1.0",
        ],
    },
    entry_points={
        "console_scripts": [
            "hsu-registry = hsu_registry.cli:main",
            "hsu-registry-ctl = hsu_registry.ctl:main",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Networking",
    ],
)
