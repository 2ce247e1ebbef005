"""
Tests for L{hsu_registry.model}: publish-body validation, the processID query
parameter, ID validation and the discover encoding.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hsu_registry.errors import InvalidRequest
from hsu_registry.model import (
    Limits,
    ModuleAPI,
    PublishRequest,
    Registration,
    encode_discover,
    encode_json,
    parse_process_id,
    parse_publish_body,
    validate_id,
)

LIMITS = Limits()

# The seed README's publish request and discover answer.
SEED_PUBLISH = b"""{
  "moduleID": "echo",
  "processID": 1234,
  "apis": [
    {
      "serviceIDs": ["service1"],
      "serverPort": 50051,
      "protocol": "grpc"
    }
  ]
}"""

SEED_DISCOVER = b"""{
  "moduleID": "echo",
  "apis": [
    {
      "serviceIDs": ["service1"],
      "serverPort": 50051,
      "protocol": "grpc"
    }
  ]
}"""

SEED_API = ModuleAPI(service_ids=("service1",), server_port=50051, protocol="grpc")


def _api(**overrides: Any) -> dict[str, Any]:
    api: dict[str, Any] = {"serviceIDs": ["service1"], "serverPort": 50051, "protocol": "grpc"}
    api.update(overrides)
    return api


def _body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"moduleID": "echo", "processID": 1234, "apis": [_api()]}
    body.update(overrides)
    return body


def _without(mapping: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != key}


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8")


class ParsePublishBodyTests(SynchronousTestCase):
    """
    L{parse_publish_body} accepts what the Go registry and its clients send.
    """

    def test_seedExample(self) -> None:
        """
        The seed README's publish body parses to the expected request.
        """
        self.assertEqual(
            parse_publish_body(SEED_PUBLISH),
            PublishRequest(module_id="echo", process_id=1234, apis=(SEED_API,)),
        )

    def test_seedCurlExample(self) -> None:
        """
        The seed's curl example (module ``test``) parses too.
        """
        body = b"""{
            "moduleID": "test",
            "processID": 1234,
            "apis": [{
              "serviceIDs": ["service1"],
              "serverPort": 50051,
              "protocol": "grpc"
            }]
          }"""
        self.assertEqual(
            parse_publish_body(body),
            PublishRequest(module_id="test", process_id=1234, apis=(SEED_API,)),
        )

    def test_goClientKeys(self) -> None:
        """
        Keys are matched case-insensitively, like Go's encoding/json, so the Go
        client's field names (C{ModuleID}, C{ProcessID}, C{APIs},
        C{ServiceIDs}, C{ServerPort}, C{Protocol}) are understood.
        """
        body = _dumps(
            {
                "ModuleID": "echo",
                "ProcessID": 1234,
                "APIs": [{"ServiceIDs": ["service1"], "ServerPort": 50051, "Protocol": "grpc"}],
            }
        )
        self.assertEqual(
            parse_publish_body(body),
            PublishRequest(module_id="echo", process_id=1234, apis=(SEED_API,)),
        )

    def test_oddCaseKeys(self) -> None:
        """
        Any mix of case matches, including the optional fields.
        """
        body = _dumps(
            {
                "MODULEID": "echo",
                "processid": 7,
                "aPiS": [
                    {
                        "serviceids": ["s"],
                        "SERVERPORT": 1,
                        "PROTOCOL": "http",
                        "Address": "10.0.0.1",
                        "MetaData": {"k": "v"},
                    }
                ],
            }
        )
        self.assertEqual(
            parse_publish_body(body),
            PublishRequest(
                module_id="echo",
                process_id=7,
                apis=(
                    ModuleAPI(
                        service_ids=("s",),
                        server_port=1,
                        protocol="http",
                        address="10.0.0.1",
                        metadata=(("k", "v"),),
                    ),
                ),
            ),
        )

    def test_unknownKeysIgnored(self) -> None:
        """
        Unknown keys, at the top level and in an API entry, are ignored
        whatever their value.
        """
        body = _body(
            extra={"deep": [1, 2, {"x": None}]},
            version=3,
            apis=[_api(weight=1.5, tags=["a"], nothing=None)],
        )
        self.assertEqual(
            parse_publish_body(_dumps(body)),
            PublishRequest(module_id="echo", process_id=1234, apis=(SEED_API,)),
        )

    def test_duplicateKeysLastWins(self) -> None:
        """
        When the same field appears twice under different case, the last one
        in the document wins, as in Go.
        """
        body = b'{"moduleID":"first","ModuleID":"second","apis":[]}'
        self.assertEqual(parse_publish_body(body).module_id, "second")
        body = b'{"ModuleID":"first","moduleID":"second","apis":[]}'
        self.assertEqual(parse_publish_body(body).module_id, "second")
        body = (
            b'{"moduleID":"echo","apis":[{"serviceIDs":["a"],"ServiceIDs":["b"],'
            b'"serverPort":1,"SERVERPORT":2,"protocol":"x","Protocol":"y"}]}'
        )
        self.assertEqual(
            parse_publish_body(body).apis,
            (ModuleAPI(service_ids=("b",), server_port=2, protocol="y"),),
        )

    def test_duplicateKeysLastWinsInterleaved(self) -> None:
        """
        Last in document order wins even when an exact key is repeated after a
        case variant: C{ModuleID, moduleID, ModuleID} takes the third value.
        """
        body = b'{"ModuleID":"a","moduleID":"b","ModuleID":"c","apis":[]}'
        self.assertEqual(parse_publish_body(body).module_id, "c")

    def test_exactDuplicateKeysLastWins(self) -> None:
        body = b'{"moduleID":"a","moduleID":"b","apis":[]}'
        self.assertEqual(parse_publish_body(body).module_id, "b")

    def test_metadataKeysKeepCase(self) -> None:
        """
        Metadata keys are data, not fields: their case is kept, and keys
        differing only in case are distinct, in the order published.
        """
        body = _body(apis=[_api(metadata={"Region": "eu", "region": "us", "TLS": ""})])
        api = parse_publish_body(_dumps(body)).apis[0]
        self.assertEqual(api.metadata, (("Region", "eu"), ("region", "us"), ("TLS", "")))

    def test_nullOptionalFieldsAbsent(self) -> None:
        """
        C{null} for address or metadata means absent.
        """
        body = _body(apis=[_api(address=None, metadata=None)])
        api = parse_publish_body(_dumps(body)).apis[0]
        self.assertIsNone(api.address)
        self.assertEqual(api.metadata, ())
        self.assertEqual(api, SEED_API)

    def test_emptyAddressAbsent(self) -> None:
        """
        An empty address means "the registry's host", like no address.
        """
        api = parse_publish_body(_dumps(_body(apis=[_api(address="")]))).apis[0]
        self.assertIsNone(api.address)

    def test_emptyMetadataObject(self) -> None:
        api = parse_publish_body(_dumps(_body(apis=[_api(metadata={})]))).apis[0]
        self.assertEqual(api.metadata, ())

    def test_address(self) -> None:
        api = parse_publish_body(_dumps(_body(apis=[_api(address="192.0.2.7")]))).apis[0]
        self.assertEqual(api.address, "192.0.2.7")

    def test_missingProcessIDIsZero(self) -> None:
        body = _without(_body(), "processID")
        self.assertEqual(parse_publish_body(_dumps(body)).process_id, 0)

    def test_nullProcessIDIsZero(self) -> None:
        self.assertEqual(parse_publish_body(_dumps(_body(processID=None))).process_id, 0)

    def test_processIDBounds(self) -> None:
        self.assertEqual(parse_publish_body(_dumps(_body(processID=0))).process_id, 0)
        maximum = LIMITS.max_process_id
        self.assertEqual(maximum, 2**32 - 1)
        self.assertEqual(parse_publish_body(_dumps(_body(processID=maximum))).process_id, maximum)

    def test_emptyApis(self) -> None:
        """
        A module may publish no APIs at all.
        """
        self.assertEqual(parse_publish_body(_dumps(_body(apis=[]))).apis, ())

    def test_severalApis(self) -> None:
        body = _body(
            apis=[
                _api(serviceIDs=["a", "b"], serverPort=1),
                _api(serviceIDs=["c"], serverPort=65535, protocol="http"),
            ]
        )
        self.assertEqual(
            parse_publish_body(_dumps(body)).apis,
            (
                ModuleAPI(service_ids=("a", "b"), server_port=1, protocol="grpc"),
                ModuleAPI(service_ids=("c",), server_port=65535, protocol="http"),
            ),
        )

    def test_byteOrderMark(self) -> None:
        """
        A UTF-8 byte order mark before the JSON is tolerated.
        """
        self.assertEqual(
            parse_publish_body(b"\xef\xbb\xbf" + SEED_PUBLISH),
            parse_publish_body(SEED_PUBLISH),
        )

    def test_surroundingWhitespace(self) -> None:
        self.assertEqual(
            parse_publish_body(b" \r\n\t" + SEED_PUBLISH + b"\n\n"),
            parse_publish_body(SEED_PUBLISH),
        )

    def test_nonASCII(self) -> None:
        """
        Non-ASCII IDs and text, raw or escaped, are accepted.
        """
        raw = '{"moduleID":"\u00e9cho","apis":[{"serviceIDs":["\u670d\u52a1"],'
        raw += '"serverPort":1,"protocol":"grpc","metadata":{"\u00fc":"\U0001f600"}}]}'
        expected = PublishRequest(
            module_id="\u00e9cho",
            process_id=0,
            apis=(
                ModuleAPI(
                    service_ids=("\u670d\u52a1",),
                    server_port=1,
                    protocol="grpc",
                    metadata=(("\u00fc", "\U0001f600"),),
                ),
            ),
        )
        self.assertEqual(parse_publish_body(raw.encode("utf-8")), expected)
        escaped = json.dumps(json.loads(raw), ensure_ascii=True).encode("ascii")
        self.assertEqual(parse_publish_body(escaped), expected)

    def test_idLengthLimit(self) -> None:
        """
        An ID of exactly C{max_id_length} characters is accepted.
        """
        self.assertEqual(LIMITS.max_id_length, 256)
        long_id = "m" * 256
        request = parse_publish_body(_dumps(_body(moduleID=long_id)))
        self.assertEqual(request.module_id, long_id)
        long_sid = "\u00e9" * 256
        api = parse_publish_body(_dumps(_body(apis=[_api(serviceIDs=[long_sid])]))).apis[0]
        self.assertEqual(api.service_ids, (long_sid,))

    def test_limitsAtTheEdge(self) -> None:
        """
        Every count and length limit is inclusive.
        """
        big = _api(
            serviceIDs=[f"s{i}" for i in range(LIMITS.max_service_ids)],
            protocol="p" * LIMITS.max_protocol_length,
            address="a" * LIMITS.max_address_length,
            metadata={
                f"{i:0{LIMITS.max_metadata_key_length}d}": "v" * LIMITS.max_metadata_value_length
                for i in range(LIMITS.max_metadata_entries)
            },
        )
        request = parse_publish_body(_dumps(_body(apis=[big])))
        self.assertEqual(len(request.apis[0].service_ids), LIMITS.max_service_ids)
        self.assertEqual(len(request.apis[0].protocol), LIMITS.max_protocol_length)
        self.assertEqual(len(request.apis[0].address or ""), LIMITS.max_address_length)
        self.assertEqual(len(request.apis[0].metadata), LIMITS.max_metadata_entries)
        request = parse_publish_body(_dumps(_body(apis=[_api()] * LIMITS.max_apis)))
        self.assertEqual(request.apis, (SEED_API,) * LIMITS.max_apis)

    def test_customLimits(self) -> None:
        """
        The limits passed in are the ones applied.
        """
        limits = Limits(max_id_length=8, max_apis=1)
        parse_publish_body(_dumps(_body(moduleID="a" * 8)), limits)
        error = self.assertRaises(
            InvalidRequest, parse_publish_body, _dumps(_body(moduleID="a" * 9)), limits
        )
        self.assertIn("moduleID", error.message)
        self.assertRaises(
            InvalidRequest, parse_publish_body, _dumps(_body(apis=[_api(), _api()])), limits
        )


class PublishRefusalTests(SynchronousTestCase):
    """
    Every refusal of L{parse_publish_body} is an L{InvalidRequest} whose
    message names the offending field.
    """

    def assertRefused(self, body: bytes | dict[str, Any], *fragments: str) -> InvalidRequest:
        raw = body if isinstance(body, bytes) else _dumps(body)
        error = self.assertRaises(InvalidRequest, parse_publish_body, raw)
        self.assertEqual(error.status, 400)
        self.assertEqual(str(error), error.message)
        for fragment in fragments:
            self.assertIn(fragment, error.message)
        return error

    def assertApiRefused(self, api: Any, *fragments: str) -> InvalidRequest:
        return self.assertRefused(_body(apis=[_api(), api]), "apis[1]", *fragments)

    # -- the body as a whole -------------------------------------------------

    def test_notUTF8(self) -> None:
        self.assertRefused(b"\xff\xfe{}", "UTF-8")
        self.assertRefused(b'{"moduleID":"\xe9cho","apis":[]}', "UTF-8")
        # A UTF-8-encoded surrogate is not UTF-8 either.
        self.assertRefused(b'{"moduleID":"\xed\xa0\x80","apis":[]}', "UTF-8")

    def test_empty(self) -> None:
        for body in [b"", b"   ", b"\r\n\t ", b"\xef\xbb\xbf", b"\xef\xbb\xbf  \n"]:
            self.assertRefused(body, "empty")

    def test_invalidJSON(self) -> None:
        for body in [
            b"{",
            b"{moduleID: 'echo'}",
            b'{"moduleID":"echo",}',
            b'{"moduleID":"echo"} {}',
            b"nul",
            b'{"moduleID":"echo\x01"}',
            b"\xef\xbb\xbf\xef\xbb\xbf{}",
        ]:
            self.assertRefused(body, "JSON")

    def test_nanAndInfinity(self) -> None:
        """
        Python's C{NaN}, C{Infinity} and C{-Infinity} extensions are not JSON.
        """
        for literal in [b"NaN", b"Infinity", b"-Infinity"]:
            self.assertRefused(literal, "JSON")
            self.assertRefused(
                b'{"moduleID":"echo","processID":' + literal + b',"apis":[]}', "JSON"
            )
            self.assertRefused(b'{"moduleID":"echo","ignored":' + literal + b',"apis":[]}', "JSON")

    def test_deeplyNested(self) -> None:
        """
        Nesting deep enough to exhaust the recursion limit is refused as an
        invalid request, not a L{RecursionError}.
        """
        self.assertRefused(b"[" * 100000, "nested")
        self.assertRefused(b"[" * 100000 + b"]" * 100000, "nested")
        self.assertRefused(b'{"a":' * 100000 + b"1" + b"}" * 100000, "nested")
        self.assertRefused(b'{"moduleID":"echo","apis":' + b"[" * 100000, "nested")

    def test_hugeInteger(self) -> None:
        """
        An integer too long for Python to convert is refused.
        """
        self.assertRefused(b'{"moduleID":"echo","processID":' + b"1" * 5000 + b',"apis":[]}')

    def test_notAnObject(self) -> None:
        for body in [b"[]", b'[{"moduleID":"echo"}]', b'"echo"', b"42", b"1.5", b"true", b"null"]:
            self.assertRefused(body, "object")

    # -- moduleID ------------------------------------------------------------

    def test_moduleIDMissing(self) -> None:
        self.assertRefused(_without(_body(), "moduleID"), "moduleID", "required")
        self.assertRefused(_body(moduleID=None), "moduleID", "required")
        self.assertRefused({}, "moduleID")

    def test_moduleIDNotString(self) -> None:
        for value in [1, 1.5, True, False, [], ["echo"], {}, {"id": "echo"}]:
            self.assertRefused(_body(moduleID=value), "moduleID", "string")

    def test_moduleIDEmpty(self) -> None:
        self.assertRefused(_body(moduleID=""), "moduleID", "empty")

    def test_moduleIDTooLong(self) -> None:
        self.assertRefused(_body(moduleID="m" * 257), "moduleID", "256")
        self.assertRefused(_body(moduleID="\u00e9" * 257), "moduleID", "256")

    def test_moduleIDSlash(self) -> None:
        for value in ["a/b", "/", "/echo", "echo/", "a//b"]:
            self.assertRefused(_body(moduleID=value), "moduleID", "'/'")

    def test_moduleIDWhitespace(self) -> None:
        for value in [" ", "a b", " echo", "echo ", "a\tb", "a\nb", "a\u00a0b", "a\u2028b"]:
            self.assertRefused(_body(moduleID=value), "moduleID")

    def test_moduleIDControlCharacters(self) -> None:
        for value in ["a\x00b", "\x01", "a\x7fb", "a\x9fb", "a\u200bb", "\ufeffecho", "a\u202eb"]:
            self.assertRefused(_body(moduleID=value), "moduleID")

    def test_moduleIDDots(self) -> None:
        self.assertRefused(_body(moduleID="."), "moduleID", "'.'")
        self.assertRefused(_body(moduleID=".."), "moduleID", "'..'")
        # Other dotted names are ordinary path segments.
        for value in ["...", ".echo", "echo.", "a..b"]:
            self.assertEqual(parse_publish_body(_dumps(_body(moduleID=value))).module_id, value)

    def test_moduleIDLoneSurrogate(self) -> None:
        self.assertRefused(b'{"moduleID":"\\ud800","apis":[]}', "moduleID", "surrogate")
        self.assertRefused(b'{"moduleID":"echo\\udfff","apis":[]}', "moduleID", "surrogate")
        # A proper surrogate pair is a valid character.
        request = parse_publish_body(b'{"moduleID":"\\ud83d\\ude00","apis":[]}')
        self.assertEqual(request.module_id, "\U0001f600")

    # -- processID -----------------------------------------------------------

    def test_processIDNegative(self) -> None:
        self.assertRefused(_body(processID=-1), "processID")
        self.assertRefused(_body(processID=-(2**40)), "processID")

    def test_processIDNotInteger(self) -> None:
        for value in [1.0, 1234.5, 1e3, True, False, "1234", "", [], {}]:
            self.assertRefused(_body(processID=value), "processID", "integer")

    def test_processIDTooLarge(self) -> None:
        self.assertRefused(_body(processID=2**32), "processID", str(2**32 - 1))
        self.assertRefused(_body(processID=2**64), "processID")

    # -- apis ----------------------------------------------------------------

    def test_apisMissingOrNull(self) -> None:
        """
        C{"apis": null} (what Go's client sends for a nil slice) and a missing
        C{apis}, like every other null or absent field, mean none: the module
        is registered with no APIs, as the original does.
        """
        for body in (_without(_body(), "apis"), _body(apis=None)):
            self.assertEqual(parse_publish_body(_dumps(body)).apis, ())

    def test_apisNotList(self) -> None:
        for value in [{}, _api(), "grpc", 1, True]:
            self.assertRefused(_body(apis=value), "apis", "list")

    def test_tooManyApis(self) -> None:
        self.assertRefused(
            _body(apis=[_api()] * (LIMITS.max_apis + 1)), "apis", str(LIMITS.max_apis)
        )

    def test_apiNotObject(self) -> None:
        for value in [None, [], ["service1"], "grpc", 50051, True]:
            self.assertApiRefused(value, "object")

    # -- serviceIDs ----------------------------------------------------------

    def test_serviceIDsMissing(self) -> None:
        self.assertApiRefused(_without(_api(), "serviceIDs"), "serviceIDs", "required")
        self.assertApiRefused(_api(serviceIDs=None), "serviceIDs", "required")

    def test_serviceIDsEmpty(self) -> None:
        self.assertApiRefused(_api(serviceIDs=[]), "serviceIDs", "empty")

    def test_serviceIDsNotList(self) -> None:
        for value in ["service1", {"service1": True}, 1, True]:
            self.assertApiRefused(_api(serviceIDs=value), "serviceIDs", "list")

    def test_serviceIDsNotStrings(self) -> None:
        values: list[list[Any]] = [[1], ["ok", None], ["ok", ["nested"]], [True], [{}]]
        for value in values:
            error = self.assertApiRefused(_api(serviceIDs=value), "serviceIDs", "string")
            self.assertIn(f"serviceIDs[{len(value) - 1}]", error.message)

    def test_serviceIDsInvalid(self) -> None:
        """
        Service IDs follow the same rules as module IDs.
        """
        for value in ["", "a/b", "a b", ".", "..", "a\x00", "s" * 257]:
            self.assertApiRefused(_api(serviceIDs=["ok", value]), "serviceIDs[1]")
        self.assertRefused(
            b'{"moduleID":"echo","apis":[{"serviceIDs":["\\udc00"],'
            b'"serverPort":1,"protocol":"grpc"}]}',
            "apis[0].serviceIDs[0]",
            "surrogate",
        )

    def test_tooManyServiceIDs(self) -> None:
        sids = [f"s{i}" for i in range(LIMITS.max_service_ids + 1)]
        self.assertApiRefused(_api(serviceIDs=sids), "serviceIDs", str(LIMITS.max_service_ids))

    # -- serverPort ----------------------------------------------------------

    def test_serverPortMissing(self) -> None:
        self.assertApiRefused(_without(_api(), "serverPort"), "serverPort", "required")
        self.assertApiRefused(_api(serverPort=None), "serverPort", "required")

    def test_serverPortOutOfRange(self) -> None:
        for value in [0, -1, 65536, 2**63]:
            self.assertApiRefused(_api(serverPort=value), "serverPort", "65535")

    def test_serverPortNotInteger(self) -> None:
        for value in [True, False, 50051.0, 5e4, "50051", [50051], {}]:
            self.assertApiRefused(_api(serverPort=value), "serverPort", "integer")

    # -- protocol ------------------------------------------------------------

    def test_protocolMissing(self) -> None:
        self.assertApiRefused(_without(_api(), "protocol"), "protocol", "required")
        self.assertApiRefused(_api(protocol=None), "protocol", "required")

    def test_protocolEmpty(self) -> None:
        self.assertApiRefused(_api(protocol=""), "protocol", "empty")

    def test_protocolNotString(self) -> None:
        for value in [1, True, ["grpc"], {}]:
            self.assertApiRefused(_api(protocol=value), "protocol", "string")

    def test_protocolTooLong(self) -> None:
        protocol = "p" * (LIMITS.max_protocol_length + 1)
        self.assertApiRefused(_api(protocol=protocol), "protocol", str(LIMITS.max_protocol_length))

    def test_protocolControlCharacters(self) -> None:
        self.assertApiRefused(_api(protocol="grpc\n"), "protocol", "control")
        self.assertRefused(
            b'{"moduleID":"echo","apis":[{"serviceIDs":["s"],'
            b'"serverPort":1,"protocol":"\\ud800"}]}',
            "apis[0].protocol",
            "surrogate",
        )

    # -- address -------------------------------------------------------------

    def test_addressNotString(self) -> None:
        for value in [1, True, ["host"], {}]:
            self.assertApiRefused(_api(address=value), "address", "string")

    def test_addressTooLong(self) -> None:
        address = "a" * (LIMITS.max_address_length + 1)
        self.assertApiRefused(_api(address=address), "address", str(LIMITS.max_address_length))

    def test_addressControlCharacters(self) -> None:
        self.assertApiRefused(_api(address="host\r\nX: y"), "address", "control")

    # -- metadata ------------------------------------------------------------

    def test_metadataNotObject(self) -> None:
        for value in [[], [["k", "v"]], "k=v", 1, True]:
            self.assertApiRefused(_api(metadata=value), "metadata", "object")

    def test_tooManyMetadataEntries(self) -> None:
        metadata = {f"k{i}": "v" for i in range(LIMITS.max_metadata_entries + 1)}
        self.assertApiRefused(_api(metadata=metadata), "metadata", str(LIMITS.max_metadata_entries))

    def test_metadataValueNotString(self) -> None:
        values: list[Any] = [1, 1.5, True, None, [], {}]
        for value in values:
            self.assertApiRefused(_api(metadata={"ok": "v", "k": value}), "metadata['k']", "string")

    def test_metadataKeyTooLong(self) -> None:
        key = "k" * (LIMITS.max_metadata_key_length + 1)
        self.assertApiRefused(
            _api(metadata={key: "v"}), "metadata key", str(LIMITS.max_metadata_key_length)
        )

    def test_metadataKeyEmpty(self) -> None:
        self.assertApiRefused(_api(metadata={"": "v"}), "metadata key", "empty")

    def test_metadataValueTooLong(self) -> None:
        value = "v" * (LIMITS.max_metadata_value_length + 1)
        self.assertApiRefused(
            _api(metadata={"k": value}), "metadata['k']", str(LIMITS.max_metadata_value_length)
        )

    def test_metadataControlCharacters(self) -> None:
        self.assertApiRefused(_api(metadata={"k\x00": "v"}), "metadata key", "control")
        self.assertApiRefused(_api(metadata={"k": "a\x1bb"}), "metadata['k']", "control")

    def test_metadataLoneSurrogate(self) -> None:
        self.assertRefused(
            b'{"moduleID":"echo","apis":[{"serviceIDs":["s"],"serverPort":1,'
            b'"protocol":"grpc","metadata":{"\\ud800":"v"}}]}',
            "apis[0].metadata key",
            "surrogate",
        )
        self.assertRefused(
            b'{"moduleID":"echo","apis":[{"serviceIDs":["s"],"serverPort":1,'
            b'"protocol":"grpc","metadata":{"k":"\\udfff"}}]}',
            "apis[0].metadata['k']",
            "surrogate",
        )

    def test_firstErrorNamed(self) -> None:
        """
        The message names the first wrong API, by index.
        """
        body = _body(apis=[_api(), _api(), _api(serverPort=0), _api(protocol="")])
        self.assertRefused(body, "apis[2].serverPort")


class ParseProcessIDTests(SynchronousTestCase):
    """
    L{parse_process_id} reads the optional C{processID} query argument.
    """

    def test_absent(self) -> None:
        self.assertIsNone(parse_process_id(None))
        self.assertIsNone(parse_process_id([]))

    def test_valid(self) -> None:
        self.assertEqual(parse_process_id([b"12"]), 12)
        self.assertEqual(parse_process_id([b"0"]), 0)
        self.assertEqual(parse_process_id([b"4294967295"]), 2**32 - 1)

    def assertRefused(self, values: list[bytes]) -> InvalidRequest:
        error = self.assertRaises(InvalidRequest, parse_process_id, values)
        self.assertIn("processID", error.message)
        return error

    def test_repeated(self) -> None:
        self.assertIn("more than once", self.assertRefused([b"12", b"12"]).message)
        self.assertRefused([b"1", b"2"])

    def test_notADecimalInteger(self) -> None:
        for raw in [b"", b"-1", b"+1", b"1.5", b"abc", b" 1", b"1 ", b"0x10", b"1e3", b"\xff"]:
            self.assertRefused([raw])

    def test_tooLarge(self) -> None:
        self.assertRefused([b"4294967296"])
        self.assertRefused([b"99999999999"])
        self.assertRefused([b"9" * 5000])

    def test_refusalContext(self) -> None:
        """
        A malformed value is echoed back in the error's context, decoded
        leniently.
        """
        self.assertEqual(self.assertRefused([b"abc"]).context, {"processID": "abc"})
        self.assertEqual(self.assertRefused([b"\xff"]).context, {"processID": "\ufffd"})


class ValidateIDTests(SynchronousTestCase):
    """
    L{validate_id} checks module and service IDs.
    """

    def test_returnsValue(self) -> None:
        for value in ["echo", "my-module_1.2", "a", "\u00e9\u670d", "%2F", "a:b@c", "~x"]:
            self.assertEqual(validate_id(value, "moduleID"), value)

    def test_namesField(self) -> None:
        error = self.assertRaises(InvalidRequest, validate_id, "a/b", "serviceIDs[3]")
        self.assertIn("serviceIDs[3]", error.message)

    def test_customLimit(self) -> None:
        self.assertEqual(validate_id("abc", "id", Limits(max_id_length=3)), "abc")
        self.assertRaises(InvalidRequest, validate_id, "abcd", "id", Limits(max_id_length=3))


class EncodeTests(SynchronousTestCase):
    """
    L{encode_discover}, L{ModuleAPI.to_json} and L{Registration} produce the
    seed's discover answer.
    """

    def test_seedDiscover(self) -> None:
        """
        The encoding is, byte for byte, the compact form of the seed's
        discover example.
        """
        expected = b'{"moduleID":"echo","apis":[{"serviceIDs":["service1"],"serverPort":50051,"protocol":"grpc"}]}'  # noqa: E501
        self.assertEqual(encode_discover("echo", (SEED_API,)), expected)
        self.assertEqual(
            expected, json.dumps(json.loads(SEED_DISCOVER), separators=(",", ":")).encode()
        )

    def test_noApis(self) -> None:
        self.assertEqual(encode_discover("echo", ()), b'{"moduleID":"echo","apis":[]}')

    def test_optionalFieldsOmittedWhenEmpty(self) -> None:
        api = ModuleAPI(
            service_ids=("service1",), server_port=50051, protocol="grpc", address="", metadata=()
        )
        self.assertEqual(api.to_json(), SEED_API.to_json())
        self.assertEqual(
            SEED_API.to_json(),
            {"serviceIDs": ["service1"], "serverPort": 50051, "protocol": "grpc"},
        )

    def test_optionalFieldsPresentInOrder(self) -> None:
        api = ModuleAPI(
            service_ids=("s1", "s2"),
            server_port=8080,
            protocol="http",
            address="10.0.0.5",
            metadata=(("zone", "b"), ("Alpha", "1")),
        )
        self.assertEqual(
            list(api.to_json()), ["serviceIDs", "serverPort", "protocol", "address", "metadata"]
        )
        self.assertEqual(
            encode_discover("web", (api,)),
            b'{"moduleID":"web","apis":[{"serviceIDs":["s1","s2"],"serverPort":8080,'
            b'"protocol":"http","address":"10.0.0.5","metadata":{"zone":"b","Alpha":"1"}}]}',
        )

    def test_onlyMetadata(self) -> None:
        api = ModuleAPI(service_ids=("s",), server_port=1, protocol="p", metadata=(("k", ""),))
        self.assertEqual(
            encode_discover("m", (api,)),
            b'{"moduleID":"m","apis":[{"serviceIDs":["s"],"serverPort":1,'
            b'"protocol":"p","metadata":{"k":""}}]}',
        )

    def test_nonASCIIStaysUTF8(self) -> None:
        api = ModuleAPI(
            service_ids=("\u670d\u52a1",),
            server_port=1,
            protocol="grpc",
            metadata=(("\u00fc", "\U0001f600"),),
        )
        body = encode_discover("\u00e9cho", (api,))
        self.assertNotIn(b"\\u", body)
        self.assertIn("\u00e9cho".encode(), body)
        self.assertIn("\U0001f600".encode(), body)
        self.assertEqual(
            json.loads(body.decode("utf-8")),
            {
                "moduleID": "\u00e9cho",
                "apis": [
                    {
                        "serviceIDs": ["\u670d\u52a1"],
                        "serverPort": 1,
                        "protocol": "grpc",
                        "metadata": {"\u00fc": "\U0001f600"},
                    }
                ],
            },
        )

    def test_encodeJSONCompact(self) -> None:
        self.assertEqual(
            encode_json({"a": [1, "\u00e9"], "b": None}), b'{"a":[1,"\xc3\xa9"],"b":null}'
        )

    def test_toJSONIsFresh(self) -> None:
        """
        Mutating what L{ModuleAPI.to_json} returns does not touch the record.
        """
        api = ModuleAPI(service_ids=("s",), server_port=1, protocol="p", metadata=(("k", "v"),))
        out = api.to_json()
        out["serviceIDs"].append("t")
        out["metadata"]["x"] = "y"
        self.assertEqual(api.service_ids, ("s",))
        self.assertEqual(api.metadata, (("k", "v"),))

    def test_registrationDiscoverBody(self) -> None:
        registration = Registration.create(
            module_id="echo", process_id=1234, apis=(SEED_API,), registered_at=1.5
        )
        self.assertEqual(registration.discover_body, encode_discover("echo", (SEED_API,)))
        self.assertEqual(registration.api_count, 1)
        self.assertEqual(
            Registration.create(module_id="x", process_id=0, apis=(), registered_at=0.0).api_count,
            0,
        )

    def test_registrationEquality(self) -> None:
        """
        Registrations compare on their fields; the cached body follows them.
        """
        one = Registration.create(
            module_id="echo", process_id=1, apis=(SEED_API,), registered_at=1.0
        )
        same = Registration.create(
            module_id="echo", process_id=1, apis=(SEED_API,), registered_at=1.0
        )
        self.assertEqual(one, same)
        self.assertEqual(hash(one), hash(same))
        self.assertNotEqual(one, attrs.evolve(one, process_id=2))
        other = Registration.create(
            module_id="other", process_id=1, apis=(SEED_API,), registered_at=1.0
        )
        self.assertEqual(other.discover_body, encode_discover("other", (SEED_API,)))
        self.assertNotEqual(one, other)

    def test_registrationAPIsRoundTrip(self) -> None:
        """The APIs decode back from the discover answer equal to what was given."""
        apis = (
            SEED_API,
            ModuleAPI(
                service_ids=("a", "b"),
                server_port=8080,
                protocol="http",
                address="10.0.0.1",
                metadata=(("z", "1"), ("a", "2")),
            ),
        )
        registration = Registration.create(
            module_id="m", process_id=1, apis=apis, registered_at=1.0
        )
        self.assertEqual(registration.apis, apis)
        self.assertEqual(Registration.from_plain(registration.plain()), registration)

    def test_registrationFrozen(self) -> None:
        registration = Registration.create(
            module_id="echo", process_id=1, apis=(), registered_at=1.0
        )
        self.assertRaises(AttributeError, setattr, registration, "apis", ())
        self.assertRaises(
            attrs.exceptions.FrozenInstanceError, setattr, registration, "discover_body", b""
        )
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, SEED_API, "protocol", "x")

    def test_recordsUntrackedByTheCyclicGC(self) -> None:
        """
        A registration's plain form holds only atomic values, so the garbage
        collector stops tracking it (what keeps full collections short at
        100 000 modules).
        """
        import gc

        api = parse_publish_body(
            b'{"moduleID":"m","apis":[{"serviceIDs":["a","b"],"serverPort":1,'
            b'"protocol":"grpc","metadata":{"k":"v"}}]}'
        ).apis[0]
        registration = Registration.create(
            module_id="m", process_id=1, apis=(api,), registered_at=1.0
        )
        plain = registration.plain()
        gc.collect(0)  # the first collection that sees it untracks it
        self.assertFalse(gc.is_tracked(plain))
        self.assertIs(type(plain), tuple)


# -- properties ----------------------------------------------------------------


def _id_char_ok(char: str) -> bool:
    return (
        char != "/" and not char.isspace() and unicodedata.category(char) not in ("Cc", "Cf", "Cs")
    )


def _text_char_ok(char: str) -> bool:
    return unicodedata.category(char) not in ("Cc", "Cs")


ids = st.text(
    alphabet=st.characters(exclude_categories=["Cs"]).filter(_id_char_ok),
    min_size=1,
    max_size=40,
).filter(lambda s: s not in (".", ".."))

texts = st.text(alphabet=st.characters(exclude_categories=["Cc", "Cs"]), max_size=40)

protocols = st.one_of(st.sampled_from(["grpc", "http", "https", "tcp"]), texts.filter(bool))

api_parts = st.fixed_dictionaries(
    {
        "service_ids": st.lists(ids, min_size=1, max_size=5),
        "server_port": st.integers(min_value=1, max_value=65535),
        "protocol": protocols,
        "address": st.one_of(st.none(), texts),
        "metadata": st.dictionaries(texts.filter(bool), texts, max_size=5),
    }
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=20),
)

json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=10), children, max_size=5),
    ),
    max_leaves=30,
)

_FIELD_NAMES = [
    "moduleID",
    "ModuleID",
    "processID",
    "ProcessID",
    "apis",
    "APIs",
    "serviceIDs",
    "ServiceIDs",
    "serverPort",
    "protocol",
    "address",
    "metadata",
]

# JSON values biased towards the registry's own field names, so the
# validation code (not only the JSON decoder) sees odd values.
field_values = st.recursive(
    st.one_of(json_scalars, st.sampled_from(["echo", "grpc", "", ".", "a/b"])),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(_FIELD_NAMES), st.text(max_size=5)), children, max_size=6
        ),
    ),
    max_leaves=30,
)


class PropertyTests(SynchronousTestCase):
    """
    Hypothesis properties of the model.
    """

    @settings(max_examples=200, deadline=None)
    @given(
        st.text(
            alphabet=st.one_of(
                st.characters(exclude_categories=[]),
                st.sampled_from(["/", ".", "%", "?", "#", "\\", " ", "\x00", "\u200b"]),
            ),
            max_size=40,
        )
    )
    def test_validIDsSurviveURLPath(self, candidate: str) -> None:
        """
        Any ID that L{validate_id} accepts survives percent-encoding into a
        path segment and decoding the way twisted.web decodes it, and never
        contains a C{/}.
        """
        try:
            value = validate_id(candidate, "moduleID")
        except InvalidRequest:
            return
        self.assertEqual(value, candidate)
        self.assertNotIn("/", value)
        self.assertNotIn(value, (".", ".."))
        segment = quote(value, safe="")
        self.assertNotIn("/", segment)
        self.assertEqual(unquote_to_bytes(segment).decode("utf-8"), value)

    @settings(max_examples=200, deadline=None)
    @given(ids)
    def test_generatedIDsSurviveURLPath(self, value: str) -> None:
        self.assertEqual(validate_id(value, "moduleID"), value)
        segment = quote(value, safe="")
        self.assertNotIn("/", segment)
        self.assertEqual(unquote_to_bytes(segment).decode("utf-8"), value)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=200))
    def test_arbitraryBytesOnlyInvalidRequest(self, body: bytes) -> None:
        try:
            parse_publish_body(body)
        except InvalidRequest:
            pass

    @settings(max_examples=200, deadline=None)
    @given(json_values)
    def test_arbitraryJSONOnlyInvalidRequest(self, value: Any) -> None:
        try:
            parse_publish_body(json.dumps(value).encode("utf-8"))
        except InvalidRequest:
            pass

    @settings(max_examples=200, deadline=None)
    @given(
        st.fixed_dictionaries(
            {},
            optional={
                "moduleID": field_values,
                "ProcessID": field_values,
                "apis": st.one_of(
                    field_values,
                    st.lists(
                        st.fixed_dictionaries(
                            {},
                            optional={
                                "serviceIDs": field_values,
                                "serverPort": field_values,
                                "protocol": field_values,
                                "address": field_values,
                                "metadata": field_values,
                            },
                        ),
                        max_size=3,
                    ),
                ),
            },
        ),
        st.booleans(),
    )
    def test_fieldShapedJSONOnlyInvalidRequest(self, value: Any, ascii_only: bool) -> None:
        """
        Objects with the right keys and arbitrary values are either accepted
        or refused with L{InvalidRequest}.
        """
        try:
            parse_publish_body(json.dumps(value, ensure_ascii=ascii_only).encode("utf-8"))
        except InvalidRequest:
            pass

    @settings(max_examples=200, deadline=None)
    @given(
        ids,
        st.integers(min_value=0, max_value=2**32 - 1),
        st.lists(api_parts, max_size=4),
        st.booleans(),
    )
    def test_validBodyRoundTrips(
        self, module_id: str, process_id: int, parts: list[dict[str, Any]], go_case: bool
    ) -> None:
        """
        A valid generated body parses to the expected request, and encoding
        its APIs with L{ModuleAPI.to_json} and parsing again gives the same
        request.
        """
        api_key, sids_key = ("APIs", "ServiceIDs") if go_case else ("apis", "serviceIDs")
        raw_apis = []
        for part in parts:
            raw: dict[str, Any] = {
                sids_key: part["service_ids"],
                "serverPort": part["server_port"],
                "protocol": part["protocol"],
            }
            if part["address"] is not None:
                raw["address"] = part["address"]
            if part["metadata"]:
                raw["metadata"] = part["metadata"]
            raw_apis.append(raw)
        body = json.dumps(
            {"moduleID": module_id, "processID": process_id, api_key: raw_apis},
            ensure_ascii=go_case,
        ).encode("utf-8")

        expected = PublishRequest(
            module_id=module_id,
            process_id=process_id,
            apis=tuple(
                ModuleAPI(
                    service_ids=tuple(part["service_ids"]),
                    server_port=part["server_port"],
                    protocol=part["protocol"],
                    address=part["address"] or None,
                    metadata=tuple(part["metadata"].items()),
                )
                for part in parts
            ),
        )
        parsed = parse_publish_body(body)
        self.assertEqual(parsed, expected)

        again = encode_json(
            {
                "moduleID": parsed.module_id,
                "processID": parsed.process_id,
                "apis": [api.to_json() for api in parsed.apis],
            }
        )
        self.assertEqual(parse_publish_body(again), parsed)

        discover = json.loads(encode_discover(parsed.module_id, parsed.apis))
        self.assertEqual(discover["moduleID"], module_id)
        self.assertEqual(discover["apis"], [api.to_json() for api in parsed.apis])
