"""audience-sync: keep marketing and analytics tools in step with SQL-defined audiences."""

__version__ = "0.1.0"
