"""Fixtures for trainer tests: the end-to-end tests' small chat data and tiny model, reused."""

from tests.integration.conftest import chat_data, e2e_model  # noqa: F401  (fixtures reused here)
