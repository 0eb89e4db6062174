"""Datasets: where they come from (``sources``), how they are fetched (``download``), parsed and
split (``mnist`` for dynamically binarized MNIST, ``binarized_mnist`` for the static binarization,
``frey`` for Frey Face), and the on-disk format of a processed split (``splits``)."""
