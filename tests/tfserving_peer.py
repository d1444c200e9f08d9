"""A TF Serving stand-in for tests: the gRPC API, not TF Serving itself.

``tensorflow_model_server`` cannot be installed here (production runs the
``tensorflow/serving`` image, see docs/tfserving.md), so the tests talk to
this peer. It serves ``PredictionService.Predict``,
``PredictionService.GetModelMetadata`` and ``ModelService.GetModelStatus``
with the real protos of tensorflow-serving-api, backed by
``tf.saved_model.load`` of the real SavedModel, and answers as TF Serving's
gRPC API does (tensorflow_serving/servables/tensorflow/predict_util.cc,
get_model_metadata_impl.cc, model_servers/get_model_status_impl.cc):

- an unknown model or version: NOT_FOUND "Servable not found for request:
  Latest(NAME)" / "Specific(NAME, VERSION)" (GetModelStatus: "Could not find
  any versions of model NAME" / "Could not find version V of model NAME");
- an unknown signature: FAILED_PRECONDITION 'Serving signature key "x" not
  found.' (the "Serving signature name: ... not found in signature def"
  wording is TF Serving's REST API, not its gRPC one);
- ``response.model_spec`` echoes name, the version that answered and the
  signature name; outputs are keyed by the signature's output aliases, as
  ``*_val`` fields with ``tensor_shape`` (TF Serving's ``AsProtoField``);
- metadata: ``signature_def`` in an ``Any`` of ``SignatureDefMap``, read from
  the version's ``saved_model.pb`` as TF Serving does.

Fault injection: ``--fail-first N --fail-code CODE`` fails the first N Predict
calls (status, metadata calls never fail); ``--delay-ms`` delays every call.

    python -m tests.tfserving_peer --model_dir DIR --port PORT

prints ``listening on 127.0.0.1:PORT`` when ready. In-process: ``serve(...)``.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from model.serving import version_dirs

DT_STRING = 7
_DEFAULT_SIGNATURE = "serving_default"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Version:
    """One loaded version: its signature functions and SignatureDefs."""

    def __init__(self, version_dir: Path):
        import tensorflow as tf
        import tensorflow_text  # noqa: F401  the tokenizer's ops
        from tensorflow.core.protobuf import saved_model_pb2

        self.number = int(version_dir.name)
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString((version_dir / "saved_model.pb").read_bytes())
        self.signature_defs = proto.meta_graphs[0].signature_def
        self._loaded = tf.saved_model.load(str(version_dir))
        self.functions = dict(self._loaded.signatures)
        self._tf = tf

    def run(self, signature: str, inputs: dict, outputs: list[str]) -> dict:
        tf = self._tf
        tensors = {alias: tf.make_ndarray(proto) for alias, proto in inputs.items()}
        result = self.functions[signature](**{k: tf.constant(v) for k, v in tensors.items()})
        return {alias: result[alias].numpy() for alias in outputs}


def _as_proto_field(array, proto) -> None:
    """What TF Serving's ``Tensor::AsProtoField`` writes for numeric outputs."""
    import numpy as np
    from tensorflow.core.framework import types_pb2

    dtypes = {np.dtype(np.float32): (types_pb2.DT_FLOAT, "float_val"),
              np.dtype(np.float64): (types_pb2.DT_DOUBLE, "double_val"),
              np.dtype(np.int64): (types_pb2.DT_INT64, "int64_val"),
              np.dtype(np.int32): (types_pb2.DT_INT32, "int_val")}
    dtype, field = dtypes[array.dtype]
    proto.dtype = dtype
    for size in array.shape:
        proto.tensor_shape.dim.add().size = size
    getattr(proto, field).extend(array.ravel().tolist())


class PeerServicer(prediction_service_pb2_grpc.PredictionServiceServicer,
                   model_service_pb2_grpc.ModelServiceServicer):
    """The three RPCs, over ``{version: _Version}`` of one model name; the
    others (Classify, Regress, MultiInference, HandleReloadConfigRequest)
    answer UNIMPLEMENTED."""

    def __init__(self, model_dir: Path | str, model_name: str = "bert_sentiment",
                 all_versions: bool = False, fail_first: int = 0,
                 fail_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
                 delay_ms: float = 0):
        dirs = version_dirs(Path(model_dir))
        if not dirs:
            raise FileNotFoundError(f"no <version>/saved_model.pb under {model_dir}")
        # TF Serving's default version policy serves the newest only.
        self.versions = {int(d.name): _Version(d) for d in (dirs if all_versions else dirs[-1:])}
        self.model_name = model_name
        self.fail_first = fail_first
        self.fail_code = fail_code
        self.delay_ms = delay_ms
        self.predict_calls = 0
        self._lock = threading.Lock()

    def _servable(self, spec, context) -> _Version:
        """TF Serving's ``GetServableHandle``: the version, or NOT_FOUND."""
        version = spec.version.value if spec.HasField("version") else None
        if spec.name == self.model_name:
            if version is None:
                return self.versions[max(self.versions)]
            if version in self.versions:
                return self.versions[version]
        request = (f"Specific({spec.name}, {version})" if version is not None
                   else f"Latest({spec.name})")
        context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {request}")

    def _delay(self) -> None:
        if self.delay_ms:
            time.sleep(self.delay_ms / 1000)

    def Predict(self, request, context):  # noqa: N802 - the gRPC method name
        from tensorflow_serving.apis import predict_pb2

        self._delay()
        with self._lock:
            self.predict_calls += 1
            call = self.predict_calls
        if call <= self.fail_first:
            context.abort(self.fail_code, f"injected failure {call} of {self.fail_first}")
        servable = self._servable(request.model_spec, context)
        name = request.model_spec.signature_name or _DEFAULT_SIGNATURE
        if name not in servable.signature_defs:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f'Serving signature key "{name}" not found.')
        signature = servable.signature_defs[name]
        wanted, given = sorted(signature.inputs), sorted(request.inputs)
        if wanted != given:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"input size does not match signature: {len(given)}!={len(wanted)} "
                          f"len({{{','.join(given)}}}) != len({{{','.join(wanted)}}}). "
                          f"Sent extra: {{{','.join(sorted(set(given) - set(wanted)))}}}. "
                          f"Missing but required: {{{','.join(sorted(set(wanted) - set(given)))}}}.")
        for index, alias in enumerate(wanted):
            expected = signature.inputs[alias].dtype
            if request.inputs[alias].dtype != expected:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"Expects arg[{index}] to be {_dtype_name(expected)} but "
                              f"{_dtype_name(request.inputs[alias].dtype)} is provided")
        outputs = list(request.output_filter) or list(signature.outputs)
        for alias in outputs:
            if alias not in signature.outputs:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"output tensor alias not found in signature: {alias} Outputs "
                              f"expected to be in the set {{{','.join(sorted(signature.outputs))}}}.")
        if len(set(outputs)) != len(outputs):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "duplicate output tensor alias")
        try:
            values = servable.run(name, dict(request.inputs), outputs)
        except Exception as err:  # noqa: BLE001 - TF's errors become INVALID_ARGUMENT there too
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err).strip().splitlines()[0])
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.signature_name = name
        response.model_spec.version.value = servable.number
        for alias, array in values.items():
            _as_proto_field(array, response.outputs[alias])
        return response

    def GetModelMetadata(self, request, context):  # noqa: N802
        from tensorflow_serving.apis import get_model_metadata_pb2

        self._delay()
        if not request.HasField("model_spec"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        if not request.metadata_field:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != "signature_def":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"Metadata field {field} is not supported")
        servable = self._servable(request.model_spec, context)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, value in servable.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(value)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self.model_name
        response.model_spec.version.value = servable.number
        response.metadata["signature_def"].Pack(signature_map)
        return response

    def GetModelStatus(self, request, context):  # noqa: N802
        from tensorflow_serving.apis import get_model_status_pb2

        self._delay()
        if not request.HasField("model_spec"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        spec = request.model_spec
        known = self.versions if spec.name == self.model_name else {}
        if spec.HasField("version"):
            if spec.version.value not in known:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Could not find version "
                              f"{spec.version.value} of model {spec.name}")
            numbers = [spec.version.value]
        else:
            if not known:
                context.abort(grpc.StatusCode.NOT_FOUND,
                              f"Could not find any versions of model {spec.name}")
            numbers = sorted(known, reverse=True)
        response = get_model_status_pb2.GetModelStatusResponse()
        for number in numbers:
            status = response.model_version_status.add()
            status.version = number
            status.state = get_model_status_pb2.ModelVersionStatus.State.AVAILABLE
        return response


def _dtype_name(dtype: int) -> str:
    from tensorflow.python.framework import dtypes

    return dtypes.as_dtype(dtype).name


class TFServingPeer:
    """A started peer: ``stop()``/``wait_for_termination()`` like a
    ``grpc.Server``, plus ``port`` and the ``servicer`` (its call counts)."""

    def __init__(self, server: grpc.Server, servicer: PeerServicer, port: int):
        self.server = server
        self.servicer = servicer
        self.port = port
        self.target = f"127.0.0.1:{port}"

    @property
    def predict_calls(self) -> int:
        return self.servicer.predict_calls

    def stop(self, grace: float | None = None) -> None:
        self.server.stop(grace).wait()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.server.wait_for_termination(timeout)


def serve(model_dir: Path | str, port: int = 0, model_name: str = "bert_sentiment", *,
          all_versions: bool = False, fail_first: int = 0,
          fail_code: grpc.StatusCode | str = grpc.StatusCode.UNAVAILABLE,
          delay_ms: float = 0, max_workers: int = 4, tls_cert: str | None = None,
          tls_key: str | None = None) -> TFServingPeer:
    """Loads the model and starts the peer on 127.0.0.1:``port`` (0: any free
    one); with ``tls_cert`` and ``tls_key`` (PEM files) it speaks TLS."""
    if isinstance(fail_code, str):
        fail_code = grpc.StatusCode[fail_code]
    servicer = PeerServicer(model_dir, model_name, all_versions, fail_first, fail_code, delay_ms)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=[("grpc.max_receive_message_length", 4 << 20)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(servicer, server)
    address = f"127.0.0.1:{port}"
    if tls_cert:
        credentials = grpc.ssl_server_credentials(
            [(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())])
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(f"cannot bind 127.0.0.1:{port}")
    server.start()
    return TFServingPeer(server, servicer, bound)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.tfserving_peer",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="base dir: <model_dir>/<version>/")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model_name", default="bert_sentiment")
    parser.add_argument("--all-versions", action="store_true",
                        help="serve every version, not only the newest")
    parser.add_argument("--fail-first", type=int, default=0,
                        help="fail the first N Predict calls")
    parser.add_argument("--fail-code", default="UNAVAILABLE",
                        choices=[c.name for c in grpc.StatusCode if c.name != "OK"])
    parser.add_argument("--delay-ms", type=float, default=0, help="delay every call")
    parser.add_argument("--tls-cert", help="PEM certificate: serve TLS (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    args = parser.parse_args(argv)
    peer = serve(args.model_dir, args.port, args.model_name, all_versions=args.all_versions,
                 fail_first=args.fail_first, fail_code=args.fail_code, delay_ms=args.delay_ms,
                 tls_cert=args.tls_cert, tls_key=args.tls_key)
    signal.signal(signal.SIGTERM, lambda *_: peer.server.stop(1))
    print(f"listening on {peer.target}", flush=True)
    try:
        peer.wait_for_termination()
    except KeyboardInterrupt:
        peer.stop(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
