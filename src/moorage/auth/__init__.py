"""Authentication, the token service, scope grammar and access decisions."""
