"""Packaging for thriftprobe. The version lives in one place: probe/__init__.py."""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read(*parts):
    with open(os.path.join(HERE, *parts), encoding="utf-8") as handle:
        return handle.read()


def version():
    found = re.search(r'^__version__ = "([^"]+)"', read("probe", "__init__.py"), re.M)
    if not found:
        raise RuntimeError("probe/__init__.py has no __version__ = \"...\" line")
    return found.group(1)


# Tools the docs build needs (`mkdocs build --strict`, API pages from docstrings).
DOCS = ["mkdocs>=1.5", "mkdocstrings[python]>=0.24"]
# mypy for `make typecheck`, pinned to one minor release: a newer mypy may add
# checks, and the gate should move only when someone raises the pin (mypy 2.4
# runs on Python 3.10+; it checks the package as Python 3.11, see pyproject.toml).
TYPECHECK = ["mypy>=2.4,<2.5; python_version >= '3.10'"]
# `make test` runs the type check, the whole suite, the private-index install and
# the docs build.
TEST = ["pytest>=7", "build>=1.0", "twine>=4", "pypiserver>=2.0", "passlib>=1.7",
        "virtualenv>=20", "playwright>=1.40", "thrift>=0.16"] + DOCS + TYPECHECK
# `probe[fastapi]`: what examples/fastapi_app.py needs (probe.aio itself needs nothing
# beyond the core); the test suite runs that example, so the test extra has it too.
FASTAPI = ["fastapi>=0.100", "uvicorn>=0.20"]
TEST += FASTAPI + ["httpx>=0.24"]  # FastAPI's TestClient

setup(
    name="thriftprobe",
    version=version(),
    description="Service governance for thrift RPC: registry, weights, switches, monitoring",
    long_description=read("README.md"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["probe", "probe.*"]),
    # Everything `probe stack` and `probe demo` need at run time, inside the wheel.
    package_data={
        "probe": ["py.typed"],
        "probe.config": ["*.yml", "*.sql"],
        "probe.demo": ["*.thrift"],
        "probe.console": ["templates/*.html", "static/*"],
    },
    include_package_data=True,
    python_requires=">=3.8",
    install_requires=[
        "thriftpy2>=0.4.16",
        "kazoo>=2.9",
        "redis>=4.1",
        "PyMySQL>=1.0",
        "PyYAML>=5.1",
        "prometheus_client>=0.16",
        "Flask>=2.3",
        "h11>=0.14",  # HTTP/1.1 parsing of the console and /metrics listeners (probe.rpc.httpserver)
        "argon2-cffi>=21.3",
        "cryptography>=3.1",  # certificates for `probe stack up --secure`
    ],
    extras_require={"test": TEST, "docs": DOCS, "fastapi": FASTAPI},
    entry_points={"console_scripts": ["probe = probe.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: System :: Distributed Computing",
        "Topic :: Software Development :: Libraries :: Python Modules",
    ],
)
