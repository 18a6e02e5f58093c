"""Metadata: tables, migrations and the stores that query them.

Code outside this package calls the stores (`RegistryStore`, `IdentityStore`)
and never opens a database session itself.
"""
