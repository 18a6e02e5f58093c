"""Blob storage: the driver interface and the registry logic above it."""
