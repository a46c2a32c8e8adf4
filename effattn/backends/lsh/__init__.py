"""Reformer LSH attention (Tay class LP): the `lsh` backend and its hashing (``hashing``)."""
