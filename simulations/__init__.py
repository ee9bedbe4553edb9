"""Many clients on one machine: in-process Flower simulation runner and populations."""
