"""Datasets: where they come from (``sources``), how they are fetched (``download``), parsed and
split (``mnist``), and the on-disk format of a processed split (``splits``)."""
