"""Memory tooling: measure (``measure``), predict (``estimate``) and profile (``profile``)."""
