"""Offsite emulators: compressed stand-ins of the backbone with trainable adapters."""
