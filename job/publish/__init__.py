"""The model card and uploads to the Hub and the run URI."""
