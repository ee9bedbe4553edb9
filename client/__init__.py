"""The edge client: Flower ClientApp that trains on local data and returns low-rank updates."""
