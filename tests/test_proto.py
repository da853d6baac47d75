"""The committed stubs describe exactly the committed .proto."""

from __future__ import annotations

import re
from pathlib import Path

from kvrecall.v1 import kvrecall_pb2 as pb

PROTO = Path(__file__).resolve().parents[1] / "proto" / "kvrecall" / "v1" / "kvrecall.proto"


def test_every_message_and_field_of_the_proto_is_in_the_stubs():
    text = re.sub(r"//[^\n]*", "", PROTO.read_text())
    for name, body in re.findall(r"message (\w+) \{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}", text):
        descriptor = pb.DESCRIPTOR.message_types_by_name[name]
        fields = re.findall(r"(?:optional |repeated )?[\w.]+ (\w+) = (\d+);", body)
        assert {(f.name, f.number) for f in descriptor.fields} == {(n, int(i)) for n, i in fields}, name


def test_enums_start_unspecified():
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values[0].number == 0 and enum.values[0].name.endswith("UNSPECIFIED")


def test_service_methods():
    service = pb.DESCRIPTOR.services_by_name["KVRecall"]
    assert [m.name for m in service.methods] == [
        "OpenSession", "IngestPrompt", "Decode", "KeepAlive", "CloseSession", "GetStats", "Boundaries",
    ]
