"""Tools around the bundle that do not ship in it: phantom generator, demo, zoo export (``custom/`` is the runtime)."""
