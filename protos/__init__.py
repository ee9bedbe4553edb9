"""Wire format: named tensors, update codecs and artifact manifests."""
