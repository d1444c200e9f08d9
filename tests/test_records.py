"""Every record's Beam schema has real field types: a Java runner (Flink) must
decode them when a keyed step crosses to it."""

import apache_beam as beam
import pytest
from apache_beam.portability.api import schema_pb2

from transforms.records import DeadLetter, Envelope, Result, Tweet

PYTHON_ONLY = "beam:logical:pythonsdk_any:v1"


def _python_only_fields(field_type: schema_pb2.FieldType, path: str) -> list[str]:
    kind = field_type.WhichOneof("type_info")
    if kind == "logical_type":
        if field_type.logical_type.urn == PYTHON_ONLY:
            return [path]
        return _python_only_fields(field_type.logical_type.representation, path)
    if kind == "array_type":
        return _python_only_fields(field_type.array_type.element_type, path + "[]")
    if kind == "iterable_type":
        return _python_only_fields(field_type.iterable_type.element_type, path + "[]")
    if kind == "map_type":
        return (_python_only_fields(field_type.map_type.key_type, path + "{key}")
                + _python_only_fields(field_type.map_type.value_type, path + "{value}"))
    if kind == "row_type":
        return [f for field in field_type.row_type.schema.fields
                for f in _python_only_fields(field.type, f"{path}.{field.name}")]
    return []


@pytest.mark.parametrize("record", [Envelope, Tweet, Result, DeadLetter],
                         ids=lambda r: r.__name__)
def test_schema_has_no_python_only_field(record):
    coder = beam.coders.registry.get_coder(record)
    assert isinstance(coder, beam.coders.RowCoder)
    schema = coder.schema
    assert [f.name for f in schema.fields] == list(record._fields)
    bad = [f for field in schema.fields for f in _python_only_fields(field.type, field.name)]
    assert bad == [], f"{record.__name__} fields Beam cannot type: {bad}"


def test_the_check_catches_postponed_annotations():
    """The check fails for a record defined under ``from __future__ import
    annotations`` (what broke the job on Flink)."""
    namespace: dict = {}
    exec(compile("from __future__ import annotations\n"
                 "from typing import NamedTuple\n"
                 "class Postponed(NamedTuple):\n"
                 "    tweet_id: str\n"
                 "    late: bool\n", "<postponed>", "exec"), namespace)
    schema = beam.coders.RowCoder.from_type_hint(namespace["Postponed"], None).schema
    found = [f for field in schema.fields for f in _python_only_fields(field.type, field.name)]
    assert found == ["tweet_id", "late"]


def test_records_round_trip_through_their_coder():
    tweet = Tweet("1", "héllo", None, "2", "en", "{}", "pubsub:9", "2026-11-20T10:00:00.000Z",
                  "", "ack", "2026-11-20T10:00:00.000Z", "2026-11-20T10:00:02.000Z", True)
    coder = beam.coders.registry.get_coder(Tweet)
    assert coder.decode(coder.encode(tweet)) == tweet
    envelope = Envelope("f:1", b"\xff\x00raw", "", "")
    coder = beam.coders.registry.get_coder(Envelope)
    assert coder.decode(coder.encode(envelope)) == envelope
