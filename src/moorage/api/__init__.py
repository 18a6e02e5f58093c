"""HTTP interfaces: the OCI distribution API, the token service and health."""
