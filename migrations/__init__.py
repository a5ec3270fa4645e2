"""Alembic migrations of the node's schema; installed as ``triage_agent.migrations``."""
