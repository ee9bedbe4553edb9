"""The coordinator: Flower ServerApp, strategy, central evaluation and results."""
