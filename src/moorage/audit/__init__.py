"""The audit trail: tamper-evident records of who did what, when, from where."""
