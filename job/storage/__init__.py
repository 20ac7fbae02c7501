"""URIs and the local, S3 and Hub storage backends."""
