"""The package version (one place; read by the manifest writer and --version)."""

__version__ = "0.1.0"
