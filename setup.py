"""Packaging for torch_logme.

The compiled fixed-point op (csrc/) is added by a later change; until then the
package is pure Python and works on any device PyTorch supports.
"""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent

setup(
    name="torch_logme",
    version="0.1.0",
    description="LogME transferability scores in PyTorch: batched over classes, on any device, exact against the published code",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["torch_logme", "torch_logme.*"]),
    package_data={"torch_logme": ["data/*.npz", "data/*.md"]},
    install_requires=["torch>=2.1", "numpy>=1.22"],
    extras_require={
        # numba JIT-compiles the numpy reference so the demo and benchmarks
        # compare against the published code at its published speed (numba's
        # linear algebra needs SciPy); the reference runs without them.
        "reference": ["numba>=0.57", "scipy"],
        # Tests run the reference both jitted and in pure Python.
        "test": ["pytest>=7", "numba>=0.57", "scipy"],
        "bench": ["pytest-benchmark>=4", "numba>=0.57", "scipy"],
    },
    entry_points={"console_scripts": ["torch-logme=torch_logme.__main__:main"]},
)
