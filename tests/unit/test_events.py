"""Event decoding: valid events pass on the fast path, every invalid one is rejected with a reason."""

from __future__ import annotations

import json
import math

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.events import (
    MAX_AMOUNT,
    decode_labels,
    decode_transactions,
    label_event,
    transaction_event,
)

T0 = 1_530_403_231_000
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=8,
)


def _valid_transaction(draw_id: int, amount: float) -> bytes:
    return orjson.dumps(transaction_event(draw_id, T0, 5, 6, amount))


def test_decode_valid_transaction_columns():
    batch = decode_transactions([_valid_transaction(7, 12.5), orjson.dumps(transaction_event(8, T0 + 1, 1, 2, 3))])
    assert batch.index.tolist() == [0, 1]
    assert batch.transaction_id.tolist() == [7, 8]
    assert batch.event_time_ms.tolist() == [T0, T0 + 1]
    assert batch.amount.tolist() == [12.5, 3.0]
    assert batch.rejected == []


def test_decode_rejects_each_invalid_case():
    good = transaction_event(1, T0, 5, 6, 10.0)
    cases = {
        "not json": b"{oops",
        "no value": None,
        "array": b"[1, 2, 3, 4, 5, 6, 7]",
        "missing field": orjson.dumps({k: v for k, v in good.items() if k != "amount"}),
        "extra field": orjson.dumps({**good, "extra": 1}),
        "wrong type": orjson.dumps({**good, "type": "label"}),
        "bool id": orjson.dumps({**good, "customer_id": True}),
        "string amount": orjson.dumps({**good, "amount": "10"}),
        "negative amount": orjson.dumps({**good, "amount": -1.0}),
        "absurd amount": orjson.dumps({**good, "amount": MAX_AMOUNT * 10}),
        "nan literal": orjson.dumps(good).replace(b"10.0", b"NaN"),
        "future time": orjson.dumps({**good, "event_time": 5_000_000_000_000}),
        "negative id": orjson.dumps({**good, "terminal_id": -3}),
        "huge id": orjson.dumps(good).replace(b'"transaction_id":1', b'"transaction_id":18446744073709551615'),
        "empty event id": orjson.dumps({**good, "event_id": ""}),
        "oversized": orjson.dumps({**good, "event_id": "x" * 20_000}),
    }
    batch = decode_transactions(list(cases.values()))
    assert len(batch) == 0
    assert [r.index for r in batch.rejected] == list(range(len(cases)))
    for rejected in batch.rejected:
        assert rejected.reason, rejected


def test_decode_keeps_valid_rows_among_invalid_ones():
    values = [b"junk", _valid_transaction(1, 1.0), None, _valid_transaction(2, 2.0)]
    batch = decode_transactions(values)
    assert batch.index.tolist() == [1, 3]
    assert batch.transaction_id.tolist() == [1, 2]
    assert [r.index for r in batch.rejected] == [0, 2]


def test_decode_labels_rejects_label_two():
    batch = decode_labels([orjson.dumps(label_event(1, T0, 2)), orjson.dumps(label_event(2, T0, 1))])
    assert batch.transaction_id.tolist() == [2]
    assert batch.label.tolist() == [1]
    assert len(batch.rejected) == 1
    assert "label must be 0 or 1" in batch.rejected[0].reason


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# json.dumps, not orjson: it also writes integers beyond 64 bits and Infinity, which must be rejected.
@given(st.lists(st.binary(max_size=300) | JSON_VALUES.map(lambda v: json.dumps(v).encode()), max_size=20))
def test_decode_never_raises_on_garbage(values):
    for decode in (decode_transactions, decode_labels):
        batch = decode(values)
        assert len(batch) + len(batch.rejected) == len(values)
        assert all(r.reason for r in batch.rejected)


@settings(max_examples=300, deadline=None)
@given(
    tx_id=st.integers(0, 2**63 - 1),
    customer=st.integers(0, 2**63 - 1),
    amount=st.floats(0, MAX_AMOUNT, allow_nan=False),
    mutation=st.sampled_from(["none", "drop", "extra", "retype"]),
    field=st.sampled_from(["type", "event_id", "transaction_id", "event_time", "customer_id", "terminal_id", "amount"]),
)
def test_decode_accepts_exactly_the_schema(tx_id, customer, amount, mutation, field):
    event = transaction_event(tx_id, T0, customer, 6, amount)
    if mutation == "drop":
        del event[field]
    elif mutation == "extra":
        event["unexpected"] = 1
    elif mutation == "retype":
        event[field] = [event[field]]
    batch = decode_transactions([orjson.dumps(event)])
    if mutation == "none":
        assert batch.transaction_id.tolist() == [tx_id]
        assert math.isclose(batch.amount[0], amount)
    else:
        assert len(batch) == 0
        assert len(batch.rejected) == 1
