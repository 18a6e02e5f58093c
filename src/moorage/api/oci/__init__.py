"""The OCI distribution API under /v2/, one module per resource."""
