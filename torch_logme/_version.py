"""The package version: its one source.

setup.py reads this file as text (it cannot import the package while it
builds it), and ``torch_logme.__version__`` imports it. Keep the assignment
a plain string literal on one line.
"""
__version__ = "0.1.0"
