"""What an S3 failure means for the job: a refusal to raise at once (403: ``PermissionDeniedError``, 404:
``ConfigError``) or a failure worth another attempt (5xx, throttling, dropped connections), for
``job.storage.retry``."""

from __future__ import annotations

from collections.abc import Callable

from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3transfer.exceptions import RetriesExceededError

from job.errors import ConfigError, JobError, PermissionDeniedError, TransientError
from job.storage import retry
from job.storage.uri import URI

_DENIED = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AccountProblem",
}
_RETRY_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
}
# The action whose 404 means "no such bucket": a HEAD's 404 has no error body to say which.
REACH_BUCKET = "reach the bucket of"


def classifier(uri: URI, action: str, credential_source: Callable[[], str]) -> retry.Classifier:
    """The classifier for ``action`` on ``uri``; ``credential_source`` names the credentials in use, for
    the message of a refusal."""

    def classify(exc: BaseException) -> JobError | retry.Retryable | None:
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return PermissionDeniedError(
                f"no usable AWS credentials to {action} {uri} (bucket '{uri.bucket}'): set AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance/IRSA role"
            )
        if isinstance(exc, ClientError):
            return _classify_client_error(exc, uri, action, credential_source)
        # BotoConnectionError: refused, DNS, connect timeouts, proxies (EndpointConnectionError and
        # kin); HTTPClientError: read timeouts and connections dropped mid-answer.
        if isinstance(
            exc,
            BotoConnectionError
            | HTTPClientError
            | IncompleteReadError
            | ResponseStreamingError
            | RetriesExceededError,
        ):
            return retry.Retryable(exc)
        return None

    return classify


def _classify_client_error(
    exc: ClientError, uri: URI, action: str, credential_source: Callable[[], str]
) -> JobError | retry.Retryable | None:
    error = exc.response.get("Error", {})
    meta = exc.response.get("ResponseMetadata", {})
    code = str(error.get("Code", ""))
    status = int(meta.get("HTTPStatusCode") or 0)
    if status in (401, 403) or code in _DENIED:
        return PermissionDeniedError(
            f"access denied to S3 bucket '{uri.bucket}' trying to {action} {uri} ({code or status}); "
            f"AWS credentials in use: {credential_source()}"
        )
    if code == "NoSuchBucket" or (status == 404 and action == REACH_BUCKET):
        return ConfigError(f"S3 bucket '{uri.bucket}' does not exist (needed to {action} {uri})")
    if status == 404 or code in ("NoSuchKey", "NotFound", "404"):
        return ConfigError(f"{uri} does not exist (trying to {action} it)")
    if status == 412 or code == "PreconditionFailed":
        return TransientError(f"{uri} changed while it was being downloaded; run again")
    if status >= 500 or status in (408, 429) or code in _RETRY_CODES:
        headers = meta.get("HTTPHeaders", {}) or {}
        return retry.Retryable(exc, retry.parse_retry_after(headers.get("retry-after")))
    return ConfigError(f"S3 refused to {action} {uri}: {code or status} {error.get('Message', '')}".strip())
