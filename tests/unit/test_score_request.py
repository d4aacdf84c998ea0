"""Validation of /score request bodies (streamer.score_request)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from streamer.features import FEATURE_NAMES
from streamer.score_request import (
    FeatureRequest,
    ScoreRequestError,
    TransactionRequest,
    parse_score_request,
)

VECTOR = [57.16, 0.0, 1.0, 1.0, 57.16, 3.0, 40.5, 12.0, 51.2, 20.0, 0.0, 140.0, 0.01, 600.0, 0.02]
TRANSACTION = {"type": "transaction", "event_id": "tx-1042", "transaction_id": 1042, "event_time": 1530403231000,
               "customer_id": 596, "terminal_id": 3156, "amount": 57.16}


def parse(body) -> FeatureRequest | TransactionRequest:
    return parse_score_request(orjson.dumps(body))


def rejection(body) -> str:
    """Return the message of the ScoreRequestError that ``body`` (JSON-encoded unless bytes) raises."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    with pytest.raises(ScoreRequestError) as info:
        parse_score_request(raw)
    return str(info.value)


# -- accepted bodies ---------------------------------------------------------------------------


def test_feature_array_parsed_as_float32_row():
    request = parse({"features": VECTOR})
    assert request.features.dtype == np.float32
    assert request.features.shape == (1, len(FEATURE_NAMES))
    assert np.array_equal(request.features[0], np.array(VECTOR, dtype=np.float32))


def test_feature_array_without_transaction_id():
    assert parse({"features": VECTOR}).transaction_id is None


def test_feature_array_with_transaction_id():
    assert parse({"features": VECTOR, "transaction_id": 7}).transaction_id == 7


def test_feature_object_ordered_by_feature_names():
    by_name = dict(reversed(list(zip(FEATURE_NAMES, VECTOR))))
    request = parse({"features": by_name})
    assert np.array_equal(request.features, parse({"features": VECTOR}).features)


def test_feature_integers_accepted():
    request = parse({"features": [1] * len(FEATURE_NAMES)})
    assert request.features.tolist() == [[1.0] * len(FEATURE_NAMES)]


def test_transaction_event_parsed():
    request = parse({"transaction": TRANSACTION})
    assert request == TransactionRequest(transaction_id=1042, event_time_ms=1530403231000, customer_id=596,
                                         terminal_id=3156, amount=57.16)


# -- rejected bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        (b"", "invalid JSON"),
        (b"{\"features\": [1, 2", "invalid JSON"),
        (b"{\"features\": [NaN]}", "invalid JSON"),
        (b"[1, 2, 3]", "the body must be a JSON object, got array"),
        (b"\"features\"", "the body must be a JSON object, got string"),
        ({}, "missing field: the body must contain 'features' or 'transaction'"),
        ({"vector": VECTOR}, "got fields ['vector']"),
        ({"features": VECTOR, "transaction": TRANSACTION}, "not both"),
        ({"features": VECTOR, "model": "x"}, "unknown fields ['model']"),
        ({"transaction": TRANSACTION, "transaction_id": 1}, "unknown fields ['transaction_id']"),
    ],
)
def test_body_shape_rejected(body, message):
    assert message in rejection(body)


@pytest.mark.parametrize(
    "features, message",
    [
        (VECTOR[:-1], "features must contain 15 values"),
        (VECTOR + [1.0], "got 16"),
        ([], "got 0"),
        ("1,2,3", "features must be an array of 15 numbers or an object keyed by feature name, got string"),
        (None, "got null"),
        (VECTOR[:3] + ["4"] + VECTOR[4:], "features[3] must be a number, got string"),
        (VECTOR[:1] + [True] + VECTOR[2:], "features[1] must be a number, got boolean"),
        (VECTOR[:5] + [None] + VECTOR[6:], "features[5] must be a number, got null"),
        (VECTOR[:5] + [[1.0]] + VECTOR[6:], "features[5] must be a number, got array"),
        (VECTOR[:14] + [1e39], "features[14] is 1e+39, outside the float32 range"),
        (VECTOR[:14] + [-1e39], "features[14] is -1e+39, outside the float32 range"),
    ],
)
def test_feature_array_rejected(features, message):
    assert message in rejection({"features": features})


def test_feature_object_unknown_name_rejected():
    by_name = dict(zip(FEATURE_NAMES, VECTOR), amount_eur=1.0)
    assert "unknown feature names ['amount_eur']" in rejection({"features": by_name})


def test_feature_object_missing_name_rejected():
    by_name = dict(zip(FEATURE_NAMES, VECTOR))
    del by_name["is_night"]
    assert "missing features ['is_night']" in rejection({"features": by_name})


def test_feature_object_value_named_in_message():
    by_name = dict(zip(FEATURE_NAMES, VECTOR), amount="57.16")
    assert "features.amount must be a number, got string" in rejection({"features": by_name})


def test_feature_huge_integer_rejected():
    # orjson reads an integer beyond 64 bits as a float, so this is a float32 range error.
    body = b'{"features": [' + b"1" * 40 + b"," + b",".join([b"0"] * 14) + b"]}"
    assert "features[0] is 1.1111111111111112e+39, outside the float32 range" in rejection(body)


@pytest.mark.parametrize("value", [-1, 2**63, 1.5, "7", None, True])
def test_transaction_id_rejected(value):
    assert "transaction_id must be a non-negative 64-bit integer" in rejection({"features": VECTOR,
                                                                                "transaction_id": value})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"amount": -1.0}, "amount must be between 0 and 1000000"),
        ({"amount": "57.16"}, "amount must be a finite number"),
        ({"customer_id": -5}, "customer_id must be a non-negative 64-bit integer"),
        ({"event_time": 12}, "event_time must be Unix milliseconds between 2000 and 2100"),
        ({"type": "label"}, "unknown event type 'label'"),
        ({"merchant": "x"}, "unexpected ['merchant']"),
    ],
)
def test_transaction_event_rejected(changes, message):
    reason = rejection({"transaction": dict(TRANSACTION, **changes)})
    assert reason.startswith("invalid transaction: ")
    assert message in reason


def test_transaction_missing_field_rejected():
    event = dict(TRANSACTION)
    del event["terminal_id"]
    assert "missing ['terminal_id']" in rejection({"transaction": event})


def test_transaction_not_object_rejected():
    assert "transaction must be a JSON object (a transaction event), got array" in rejection({"transaction": [1]})
