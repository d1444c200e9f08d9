"""Start-up checks of ``python -m pipeline``: the model and Pub/Sub, before the job runs.

Each failure is a ``ValueError`` whose text names the flag to change, so the
CLI prints one line and exits 2 instead of the runner's tracebacks (a missing
subscription surfaced as ten of them; missing credentials as a retry loop).
Redis is checked the same way by ``runners.local_redis.ensure_redis``, and
TF Serving by its model handler.
"""

from __future__ import annotations

import logging
import os

_LOG = logging.getLogger(__name__)

CREDENTIALS_HINT = ("set PUBSUB_EMULATOR_HOST for the emulator, or Application Default "
                    "Credentials for Google Cloud (gcloud auth application-default login)")
# Seconds to wait for Pub/Sub's answer; an emulator answers in milliseconds.
DEFAULT_TIMEOUT_S = 10.0
_PUBSUB_SCOPE = "https://www.googleapis.com/auth/pubsub"


def check_model(o) -> None:
    """The local SavedModel exists (``--model_dir``); TF Serving checks its own."""
    if o.inference != "local":
        return
    from model.serving import resolve

    try:
        resolve(o.model_dir)
    except FileNotFoundError as err:
        raise ValueError(f"--model_dir {o.model_dir}: {err}") from None


def check_pubsub(o, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """The subscription (``--input_subscription``) or topic (``--input_topic``)
    exists, and there are credentials to read it with.

    A permission error on the look-up is only logged: a job's service account
    may consume a subscription without being allowed to read its metadata.
    """
    if not o.is_pubsub:
        return
    if o.input_subscription:
        flag, path, kind = "--input_subscription", o.input_subscription, "subscription"
    else:
        flag, path, kind = "--input_topic", o.input_topic, "topic"
    emulator = os.environ.get("PUBSUB_EMULATOR_HOST")
    if not emulator:
        _check_credentials(flag, path)
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions

    where = f"the emulator at {emulator} (PUBSUB_EMULATOR_HOST)" if emulator else "Pub/Sub"
    try:
        _look_up(kind, path, timeout_s)
    except api_exceptions.NotFound:
        raise ValueError(f"{flag} {path}: no such {kind}") from None
    except api_exceptions.PermissionDenied as err:
        _LOG.warning("%s %s: cannot look it up (%s); starting anyway", flag, path, err.message)
    except api_exceptions.InvalidArgument as err:
        raise ValueError(f"{flag} {path}: {err.message}") from None
    except (api_exceptions.Unauthenticated, auth_exceptions.GoogleAuthError) as err:
        raise ValueError(f"{flag} {path}: the credentials were refused ({err}); "
                         f"{CREDENTIALS_HINT}") from None
    except (api_exceptions.DeadlineExceeded, api_exceptions.ServiceUnavailable,
            api_exceptions.RetryError) as err:
        raise ValueError(f"{flag} {path}: no answer from {where} ({type(err).__name__}; "
                         f"waited at most {timeout_s:g}s)") from None


def _check_credentials(flag: str, path: str) -> None:
    import google.auth
    from google.auth import exceptions as auth_exceptions

    # It logs a warning for each place it looked in vain; the error says it all.
    auth_log = logging.getLogger("google.auth._default")
    level = auth_log.level
    auth_log.setLevel(logging.ERROR)
    try:
        google.auth.default(scopes=[_PUBSUB_SCOPE])
    except auth_exceptions.DefaultCredentialsError:
        raise ValueError(f"{flag} {path}: no Google Cloud credentials: {CREDENTIALS_HINT}"
                         ) from None
    finally:
        auth_log.setLevel(level)


def _look_up(kind: str, path: str, timeout_s: float) -> None:
    """One ``Get`` call, no retries (the client honours PUBSUB_EMULATOR_HOST)."""
    from google.cloud import pubsub_v1

    if kind == "subscription":
        with pubsub_v1.SubscriberClient() as client:
            client.get_subscription(request={"subscription": path}, timeout=timeout_s,
                                    retry=None)
        return
    client = pubsub_v1.PublisherClient()
    try:
        client.get_topic(request={"topic": path}, timeout=timeout_s, retry=None)
    finally:
        client.stop()


def check_inputs(o, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Everything the job reads besides Redis: the model, then Pub/Sub."""
    check_model(o)
    check_pubsub(o, timeout_s)
