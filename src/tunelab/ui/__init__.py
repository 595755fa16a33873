"""The Streamlit dashboard: ``tunelab ui`` runs :mod:`tunelab.ui.app`.

Pages only render; everything they read or do goes through :mod:`tunelab.ui.actions`,
which calls the same service functions as the CLI and the API.
"""
