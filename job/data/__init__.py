"""Dataset discovery, captions, image transforms, aspect buckets and the sampler."""
