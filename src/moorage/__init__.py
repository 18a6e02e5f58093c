"""Moorage: a container registry for vendors that ship images to many customers."""

__version__ = "0.1.0"
