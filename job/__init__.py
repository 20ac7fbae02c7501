"""lokr-job: train a LyCORIS LoKr adapter for AuraFlow as one resumable batch job."""

__version__ = "0.1.0"
