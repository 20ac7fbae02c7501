"""The ``fetch`` stage: the config set, datasets and base model copied from S3 or the Hub to the work directory."""
