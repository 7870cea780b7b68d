"""The package version, in a leaf module so that modules inside the package can import it at their top."""

__version__ = "0.1.0"
