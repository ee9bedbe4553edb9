"""Pure functions from client updates (named numpy arrays) to a global update."""
