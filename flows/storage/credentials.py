"""Object-store options and credentials.

S3 options come from the standard environment (``AWS_ENDPOINT_URL[_S3]``, ``AWS_PROFILE``,
``AWS_REGION``/``AWS_DEFAULT_REGION``; keys via ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN``, read by botocore itself) overlaid by an explicit config dict; options are never
logged (:func:`redact` replaces secrets). :func:`credential_problem` recognises a refusal for lack of credentials
in an exception chain (the stores turn it into :class:`~flows.storage.errors.StoreCredentialsError`).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

__all__ = ["redact", "secret_paths", "is_secret_key", "s3_options_from_env", "merge_s3_options", "credential_problem",
           "refuse_url_secret"]

# Keys whose values are credentials (compared lower case without '_' and '-'), anywhere in a tree of options.
_SECRET_PARTS = ("secret", "password", "passwd", "token", "credential", "sastoken", "connectionstring")
_SECRET_KEYS = ("sas", "pass", "pwd")
_URL_PASSWORD = re.compile(r"(://[^/@\s:]*):[^/@\s]*@")


def is_secret_key(key: Any) -> bool:
    """``key``, ``secret``, ``aws_secret_access_key``, ``token``, ``SSECustomerKey``, ``password``, ... (not
    ``endpoint_url``, ``region_name``, ``signature_version``)."""
    norm = re.sub(r"[_\-]", "", str(key).lower())
    return norm in _SECRET_KEYS or norm.endswith("key") or any(w in norm for w in _SECRET_PARTS)


def secret_paths(options: Any, prefix: str = "storage_options") -> list[str]:
    """Paths of every credential-looking entry anywhere in a tree of options (secret-looking keys with a value; URLs
    with a password in them)."""
    out: list[str] = []
    if isinstance(options, Mapping):
        for k, v in options.items():
            path = f"{prefix}.{k}"
            if is_secret_key(k) and v not in (None, "", False):
                out.append(path)
            else:
                out += secret_paths(v, path)
    elif isinstance(options, (list, tuple)):
        for i, v in enumerate(options):
            out += secret_paths(v, f"{prefix}[{i}]")
    elif isinstance(options, str) and _URL_PASSWORD.search(options):
        out.append(prefix)
    return out


def refuse_url_secret(url: str, what: str = "store URL") -> None:
    """A store URL with credentials in it (``s3://KEY:SECRET@bucket``) is refused before it is used or printed."""
    if isinstance(url, str) and _URL_PASSWORD.search(url):
        raise ValueError(f"the {what} holds credentials (not shown): it would be printed and recorded; put them in the "
                         "environment instead (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")


def redact(options: Any) -> Any:
    """A copy of a tree of options (or a whole config) with every secret-looking value replaced by '***', at any depth
    (safe to print or record)."""
    if isinstance(options, Mapping):
        return {k: ("***" if is_secret_key(k) and v not in (None, "", False) else redact(v)) for k, v in options.items()}
    if isinstance(options, (list, tuple)):
        return [redact(v) for v in options]
    if isinstance(options, str):
        return _URL_PASSWORD.sub(r"\1:***@", options)
    return options


def s3_options_from_env(env: Mapping[str, str] | None = None) -> dict:
    """s3fs options from the standard AWS environment variables (credentials themselves are left to botocore)."""
    env = os.environ if env is None else env
    opts: dict = {}
    client: dict = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        client["endpoint_url"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        client["region_name"] = region
    if client:
        opts["client_kwargs"] = client
    if env.get("AWS_PROFILE"):
        opts["profile"] = env["AWS_PROFILE"]
    return opts


def merge_s3_options(config: Mapping | None) -> dict:
    """Environment first, then the config section; shortcuts endpoint_url / region go to client_kwargs."""
    opts = s3_options_from_env()
    config = dict(config or {})
    client = dict(opts.get("client_kwargs", {}))
    for short, long in (("endpoint_url", "endpoint_url"), ("region", "region_name"), ("region_name", "region_name")):
        if short in config:
            client[long] = config.pop(short)
    client.update(config.pop("client_kwargs", {}) or {})
    opts.update(config)
    if client:
        opts["client_kwargs"] = client
    return opts


_CRED_CLASSES = ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound", "CredentialRetrievalError")
_CRED_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken")


def credential_problem(exc: BaseException) -> Optional[str]:
    """The message of the first credentials refusal in ``exc``'s chain of causes, else None."""
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        name = type(e).__name__
        if name in _CRED_CLASSES:
            return str(e)
        msg = str(e)
        if "Unable to locate credentials" in msg or any(c in msg for c in _CRED_CODES):
            return msg
        e = e.__cause__ or e.__context__
    return None
