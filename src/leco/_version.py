"""The package version, in a module of its own: every module can name it without importing the package
root, whose train() reaches the whole training stack."""

__version__ = "0.1.0"
