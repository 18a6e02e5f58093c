"""Backups of an installation (metadata and blobs) into a directory, and restores."""
