"""One module per noun; each route is parse → one services call → render."""
