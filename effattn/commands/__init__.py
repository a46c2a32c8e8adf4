"""The commands that belong to no study: the backend list."""
