"""One module per dashboard page, each with a ``render()`` that Streamlit's navigation calls.

Not named ``pages``: Streamlit treats a ``pages/`` folder beside the entry script as pages of
its own, and a browser's first visit to a fresh dashboard at a page's address (``/runs``, a
bookmark) then ran that module as a script of its own, which only defines functions: a blank page.
"""
