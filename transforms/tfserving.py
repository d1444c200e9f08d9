"""Remote inference on TensorFlow Serving over gRPC.

``TFServingModelHandler`` is a Beam ``RemoteModelHandler``: one gRPC channel
per worker, opened in ``create_client`` (Beam's ``load_model``, i.e. the
DoFn's setup); each batch goes out as ``PredictRequest``s of raw UTF-8
strings (the model tokenizes in its graph), split so that no request nears
gRPC's default 4 MiB message limit. Beam retries with exponential backoff
(from 5 s, doubling) on UNAVAILABLE, DEADLINE_EXCEEDED and
RESOURCE_EXHAUSTED, and throttles adaptively when the server keeps failing.
A batch that outlives its retries raises ``TFServingUnavailable``, a
``BatchFailure``: every tweet of the batch goes to the dead letter with the
gRPC status in its reason, without being retried again one by one.

``tfserving_handler(config)`` first asks the server for the model's status
and signature (``TFServingClient.check``) and raises ``ValueError`` naming the flag to
fix, so a wrong target, model name, version or signature stops the job at
start instead of dead-lettering every tweet.

``TFServingClient`` is the plain client underneath, also for benchmarks::

    client = TFServingClient("127.0.0.1:8500", "bert_sentiment")
    probabilities, version = client.predict(["what a day", "meh"])
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import grpc
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import RemoteModelHandler

from bertstream.config import TFServingConfig
from transforms.inference import BatchFailure, Scores

_LOG = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "bert_sentiment"
DEFAULT_SIGNATURE = "serving_default"
OUTPUT = "probabilities"
# Beam's backoff starts at 5 s and doubles (fuzzed down by up to half):
# 4 retries wait 37-75 s in all, long enough for a TF Serving pod to restart.
DEFAULT_RETRIES = 4
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED})
# gRPC refuses messages over 4 MiB by default (TF Serving raises its own
# limit, proxies and other servers may not); leave room for the envelope.
MAX_REQUEST_BYTES = 3 << 20
# Protobuf overhead per string in a TensorProto: a tag and a length varint.
_PER_STRING_BYTES = 6


class TFServingError(Exception):
    """A failed RPC to TF Serving; ``str()`` starts with the status code name."""

    def __init__(self, code: grpc.StatusCode, details: str, where: str):
        super().__init__(code, details, where)
        self.code = code
        self.details = details
        self.where = where

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details} ({self.where})"


class TFServingUnavailable(TFServingError, BatchFailure):
    """A retryable status (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED):
    the server, not an element, is at fault."""


def is_retryable(err: Exception) -> bool:
    """Beam's ``retry_filter``: retry only what a later call can fix."""
    return isinstance(err, TFServingUnavailable)


class ServingInfo(NamedTuple):
    """What the start-up check learned from the server."""

    version: int
    input_name: str
    signatures: tuple[str, ...]


def _rpc_error(err: grpc.RpcError, where: str) -> TFServingError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    cls = TFServingUnavailable if code in RETRYABLE else TFServingError
    return cls(code, details, where)


def _channel(target: str, tls: bool, ca_file: str | None) -> grpc.Channel:
    # round_robin: with a headless Service (dns:///bertservice-pods:8500) the
    # channel spreads requests over every replica, not one connection.
    options = [("grpc.max_send_message_length", -1), ("grpc.lb_policy_name", "round_robin")]
    if not tls:
        return grpc.insecure_channel(target, options=options)
    roots = None
    if ca_file:
        with open(ca_file, "rb") as f:
            roots = f.read()
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots),
                               options=options)


def tensor_to_array(proto) -> np.ndarray:
    """A numeric ``TensorProto`` as an ndarray, in any of TF Serving's encodings
    (``*_val`` fields, ``tensor_content``, one value repeated): TensorFlow's own
    ``tf.make_ndarray``. (TF Serving's protos import TensorFlow anyway.)"""
    import tensorflow as tf
    from tensorflow.core.framework import types_pb2

    if proto.dtype not in (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_INT64):
        raise ValueError(f"unsupported output dtype {types_pb2.DataType.Name(proto.dtype)}")
    return tf.make_ndarray(proto)


def split_by_size(texts: Sequence[bytes], max_bytes: int) -> Iterator[Sequence[bytes]]:
    """Consecutive slices of ``texts`` whose encoded size stays under ``max_bytes``.

    Raises:
      ValueError: for a single text over the limit (that element alone fails).
    """
    start, size = 0, 0
    for i, text in enumerate(texts):
        cost = len(text) + _PER_STRING_BYTES
        if cost > max_bytes:
            raise ValueError(f"text of {len(text)} bytes exceeds the {max_bytes}-byte "
                             "request limit")
        if size + cost > max_bytes and i > start:
            yield texts[start:i]
            start, size = i, 0
        size += cost
    if start < len(texts):
        yield texts[start:]


class TFServingClient:
    """A ``PredictionService`` client for one model signature that takes text.

    Args:
      target: ``host:port`` of TF Serving's gRPC port (8500).
      model_name: the model's name on the server (``--model_name`` of TF Serving).
      signature: the signature to call.
      version: a pinned version; ``None`` lets the server pick its newest.
      timeout_seconds: deadline of each RPC.
      tls: use TLS; ``ca_file`` is the CA bundle (default: system roots).
      input_name: the signature's input (``check()`` reads it from the server).
      max_request_bytes: split a batch so each request stays under this.
    """

    def __init__(self, target: str, model_name: str = DEFAULT_MODEL_NAME,
                 signature: str = DEFAULT_SIGNATURE, version: int | None = None,
                 timeout_seconds: float = 10.0, tls: bool = False,
                 ca_file: str | None = None, input_name: str = "text",
                 max_request_bytes: int = MAX_REQUEST_BYTES):
        from tensorflow_serving.apis import (
            model_service_pb2_grpc,
            prediction_service_pb2_grpc,
        )

        self.target = target
        self.model_name = model_name
        self.signature = signature
        self.version = version
        self.timeout_seconds = timeout_seconds
        self.input_name = input_name
        self.tls = tls
        self.max_request_bytes = max_request_bytes
        self._channel = _channel(target, tls, ca_file)
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TFServingClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _spec(self, spec, signature: bool = True) -> None:
        spec.name = self.model_name
        if signature:
            spec.signature_name = self.signature
        if self.version is not None:
            spec.version.value = self.version

    def _call(self, method, request, what: str):
        try:
            return method(request, timeout=self.timeout_seconds)
        except grpc.RpcError as err:
            raise _rpc_error(err, f"{what} {self.model_name} at {self.target}") from None

    def predict_chunks(self, texts: Sequence[bytes | str]
                       ) -> Iterator[tuple[np.ndarray, str]]:
        """``(probabilities [n, 3], model_version)`` per request, in order."""
        from tensorflow.core.framework import types_pb2
        from tensorflow_serving.apis import predict_pb2

        encoded = [t.encode("utf-8") if isinstance(t, str) else bytes(t) for t in texts]
        for chunk in split_by_size(encoded, self.max_request_bytes):
            request = predict_pb2.PredictRequest()
            self._spec(request.model_spec)
            request.output_filter.append(OUTPUT)
            tensor = request.inputs[self.input_name]
            tensor.dtype = types_pb2.DT_STRING
            tensor.tensor_shape.dim.add().size = len(chunk)
            tensor.string_val.extend(chunk)
            response = self._call(self._predict.Predict, request, "Predict")
            if OUTPUT not in response.outputs:
                raise TFServingError(grpc.StatusCode.INTERNAL,
                                     f"no '{OUTPUT}' in the response",
                                     f"Predict {self.model_name} at {self.target}")
            probabilities = tensor_to_array(response.outputs[OUTPUT])
            if probabilities.shape[0] != len(chunk):
                raise TFServingError(grpc.StatusCode.INTERNAL,
                                     f"{probabilities.shape[0]} rows for {len(chunk)} texts",
                                     f"Predict {self.model_name} at {self.target}")
            yield probabilities, str(response.model_spec.version.value)

    def predict(self, texts: Sequence[bytes | str]) -> tuple[np.ndarray, str]:
        """Probabilities ``[len(texts), 3]`` (negative, neutral, positive) and the
        model version that answered (the last one, if a batch was split)."""
        parts = list(self.predict_chunks(texts))
        if not parts:
            return np.zeros((0, 3), np.float32), ""
        return np.concatenate([p for p, _ in parts]), parts[-1][1]

    def check(self) -> ServingInfo:
        """Asks the server for the model's status and signature.

        Raises:
          ValueError: naming the flag to fix.
        """
        from tensorflow.core.framework import types_pb2
        from tensorflow_serving.apis import (
            get_model_metadata_pb2,
            get_model_status_pb2,
        )

        ModelVersionStatus = get_model_status_pb2.ModelVersionStatus  # noqa: N806 - a proto
        where = f"--tfserving_target {self.target}"
        status = get_model_status_pb2.GetModelStatusRequest()
        status.model_spec.name = self.model_name
        try:
            versions = self._models.GetModelStatus(status, timeout=self.timeout_seconds)
        except grpc.RpcError as err:
            failure = _rpc_error(err, "GetModelStatus")
            if failure.code == grpc.StatusCode.NOT_FOUND:
                raise ValueError(f"--tfserving_model_name {self.model_name}: TF Serving at "
                                 f"{self.target} has no such model ({failure})") from None
            hint = (" with TLS: check --tfserving_tls and --tfserving_ca_file"
                    if self.tls else "")
            raise ValueError(f"{where}: no TF Serving answers there{hint} ({failure})"
                             ) from None
        states = {v.version: v.state for v in versions.model_version_status}
        available = sorted(v for v, state in states.items()
                           if state == ModelVersionStatus.State.AVAILABLE)
        if self.version is not None and self.version not in available:
            raise ValueError(
                f"--tfserving_model_version {self.version}: model {self.model_name} has no "
                f"such version available (available: {available or 'none'})")
        if not available:
            raise ValueError(f"--tfserving_model_name {self.model_name}: no version of it is "
                             f"available yet on {self.target} (states: {states})")

        metadata = get_model_metadata_pb2.GetModelMetadataRequest()
        self._spec(metadata.model_spec, signature=False)
        metadata.metadata_field.append("signature_def")
        try:
            response = self._call(self._predict.GetModelMetadata, metadata, "GetModelMetadata")
        except TFServingError as err:
            raise ValueError(f"{where}: GetModelMetadata failed ({err})") from None
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        signatures = tuple(sorted(k for k in signature_map.signature_def
                                  if not k.startswith("__")))
        if self.signature not in signature_map.signature_def:
            raise ValueError(f"--tfserving_signature {self.signature}: model "
                             f"{self.model_name} has no such signature (it has "
                             f"{', '.join(signatures)})")
        signature = signature_map.signature_def[self.signature]
        inputs = {name: info.dtype for name, info in signature.inputs.items()}
        if len(inputs) != 1 or next(iter(inputs.values())) != types_pb2.DT_STRING:
            raise ValueError(f"--tfserving_signature {self.signature}: takes {sorted(inputs)}; "
                             "the pipeline needs a signature with one string input")
        if "examples" in inputs:  # the TFX convention: serialized tf.Example, not text
            raise ValueError(f"--tfserving_signature {self.signature}: takes serialized "
                             "tf.Example ('examples'); the pipeline sends raw text (use "
                             f"{DEFAULT_SIGNATURE})")
        output = signature.outputs.get(OUTPUT)
        if output is None or output.dtype != types_pb2.DT_FLOAT:
            raise ValueError(f"--tfserving_signature {self.signature}: needs a float output "
                             f"'{OUTPUT}', has {sorted(signature.outputs)}")
        version = response.model_spec.version.value
        (self.input_name,) = inputs
        _LOG.info("TF Serving at %s: model %s version %d, signature %s(%s)", self.target,
                  self.model_name, version, self.signature, self.input_name)
        return ServingInfo(version, self.input_name, signatures)


class TFServingModelHandler(RemoteModelHandler):
    """UTF-8 texts -> ``Scores`` on TF Serving (see the module docstring).

    Args:
      target, model_name, signature, version, timeout_seconds, tls, ca_file,
      input_name, max_request_bytes: as for ``TFServingClient``.
      num_retries: retries of a batch on a retryable status (Beam's backoff).
      throttle_delay_secs: how long Beam's adaptive throttler waits when it
        holds a request back.
    """

    def __init__(self, target: str, model_name: str = DEFAULT_MODEL_NAME,
                 signature: str = DEFAULT_SIGNATURE, version: int | None = None,
                 timeout_seconds: float = 10.0, tls: bool = False,
                 ca_file: str | None = None, input_name: str = "text",
                 max_request_bytes: int = MAX_REQUEST_BYTES,
                 num_retries: int = DEFAULT_RETRIES, throttle_delay_secs: int = 5):
        super().__init__(namespace="TFServing", num_retries=num_retries,
                         throttle_delay_secs=throttle_delay_secs, retry_filter=is_retryable)
        self._client_args = {
            "target": target, "model_name": model_name, "signature": signature,
            "version": version, "timeout_seconds": timeout_seconds, "tls": tls,
            "ca_file": ca_file, "input_name": input_name,
            "max_request_bytes": max_request_bytes}
        self._requests = Metrics.counter("TFServing", "predict_requests")
        self._failures = Metrics.counter("TFServing", "predict_failures")
        self._latency = Metrics.distribution("TFServing", "predict_latency_ms")

    def create_client(self) -> TFServingClient:
        return TFServingClient(**self._client_args)

    def request(self, batch: Sequence[bytes], model: TFServingClient,
                inference_args: dict[str, Any] | None = None) -> list[Scores]:
        scores: list[Scores] = []
        started = time.monotonic()
        try:
            for probabilities, version in model.predict_chunks(batch):
                self._requests.inc()
                scores.extend(Scores(row.tolist(), version) for row in probabilities)
        except TFServingError:
            self._failures.inc()
            raise
        self._latency.update(int((time.monotonic() - started) * 1000))
        return scores

    def get_metrics_namespace(self) -> str:
        return "TFServing"


def tfserving_handler(config: TFServingConfig, **overrides: Any) -> TFServingModelHandler:
    """The handler for ``--inference tfserving``, after the start-up check.

    Args:
      config: where TF Serving is and what to call there (the ``--tfserving_*``
        flags; ``BertstreamOptions.tfserving_config()``).
      **overrides: other ``TFServingModelHandler`` arguments (``num_retries``...).

    Raises:
      ValueError: naming the flag to fix, when the server, model, version or
        signature is not what the pipeline needs.
    """
    config.validate()
    args = {"target": config.target, "model_name": config.model_name,
            "signature": config.signature, "version": config.model_version,
            "timeout_seconds": config.timeout_seconds, "tls": config.tls,
            "ca_file": config.ca_file}
    try:
        client = TFServingClient(**args)
    except OSError as err:
        raise ValueError(f"--tfserving_ca_file {config.ca_file}: {err}") from None
    with client:
        info = client.check()
    return TFServingModelHandler(**args, input_name=info.input_name, **overrides)
