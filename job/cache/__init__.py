"""The latent and text-embedding caches: keys, on-disk format, warm-up, the training reader."""
