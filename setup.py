from setuptools import find_packages, setup

setup(
    name="thriftprobe",
    version="0.1.0",
    description="Service governance for thrift RPC: registry, weights, switches, monitoring",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["probe", "probe.*"]),
    package_data={"probe.config": ["*.yml", "*.sql"]},
    include_package_data=True,
    python_requires=">=3.8",
    install_requires=[
        "thriftpy2>=0.4.16",
        "kazoo>=2.9",
        "redis>=4.1",
        "PyMySQL>=1.0",
        "PyYAML>=5.1",
        "prometheus_client>=0.16",
    ],
    extras_require={"test": ["pytest>=7", "thrift>=0.16"]},
    entry_points={"console_scripts": ["probe = probe.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: System :: Distributed Computing",
        "Topic :: Software Development :: Libraries :: Python Modules",
    ],
)
