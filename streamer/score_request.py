"""Validation of the JSON bodies of the inference worker's ``POST /score`` requests.

A body is one JSON object of one of two forms:

- ``{"features": [...15 numbers...], "transaction_id": 1042}``: a feature vector in the
  order of `FEATURE_NAMES`, or an object keyed by feature name. ``transaction_id`` is
  optional and only echoed in the response.
- ``{"transaction": {...}}``: a transaction event exactly as on the ``transactions`` topic
  (see `streamer.events`), whose features the worker computes from its current state.

Every check names the field that failed and why, so a 400 response can say it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import orjson

from .errors import StreamerError
from .events import MAX_ID, decode_transactions
from .features import FEATURE_NAMES

# Largest body accepted, in bytes. A request is about 300 bytes, so this leaves room for
# whitespace and long event ids while bounding what one request can make the worker parse.
MAX_BODY_BYTES = 64 * 1024
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FEATURE_FIELDS = ("features", "transaction_id")
_TRANSACTION_FIELDS = ("transaction",)


class ScoreRequestError(StreamerError):
    """A /score request body is invalid; the message names the field and the reason."""


@dataclass(frozen=True)
class FeatureRequest:
    """A request that gives the feature vector itself."""

    features: np.ndarray  # float32, shape (1, len(FEATURE_NAMES))
    transaction_id: int | None


@dataclass(frozen=True)
class TransactionRequest:
    """A request that gives a transaction event, to be featurised from the worker's state."""

    transaction_id: int
    event_time_ms: int
    customer_id: int
    terminal_id: int
    amount: float


def parse_score_request(body: bytes) -> FeatureRequest | TransactionRequest:
    """Parse and validate a /score body.

    Raises:
        ScoreRequestError: the body is not a JSON object of one of the two forms, or a
            field has a wrong type, length or value.
    """
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ScoreRequestError(f"invalid JSON: {exc}") from None
    if type(request) is not dict:
        raise ScoreRequestError(f"the body must be a JSON object, got {_json_type(request)}")

    if "features" in request and "transaction" in request:
        raise ScoreRequestError("give either 'features' or 'transaction', not both")
    if "features" in request:
        _raise_if_unknown_fields(request, _FEATURE_FIELDS)
        return FeatureRequest(parse_features(request["features"]), _parse_transaction_id(request))
    if "transaction" in request:
        _raise_if_unknown_fields(request, _TRANSACTION_FIELDS)
        return parse_transaction(request["transaction"])
    raise ScoreRequestError(
        f"missing field: the body must contain 'features' or 'transaction', got fields {sorted(request)}"
    )


def parse_features(value) -> np.ndarray:
    """Return a feature vector, a JSON array in `FEATURE_NAMES` order or an object keyed by name, as float32 (1, n).

    Raises:
        ScoreRequestError: wrong container type, wrong length, missing or unknown names,
            or a value that is not a finite number within the float32 range.
    """
    if type(value) is list:
        if len(value) != len(FEATURE_NAMES):
            raise ScoreRequestError(
                f"features must contain {len(FEATURE_NAMES)} values in the order {list(FEATURE_NAMES)}, "
                f"got {len(value)}"
            )
        numbers = [_feature_value(f"features[{i}]", item) for i, item in enumerate(value)]
    elif type(value) is dict:
        unknown = sorted(value.keys() - set(FEATURE_NAMES))
        if unknown:
            raise ScoreRequestError(f"unknown feature names {unknown}; the features are {list(FEATURE_NAMES)}")
        missing = [name for name in FEATURE_NAMES if name not in value]
        if missing:
            raise ScoreRequestError(f"missing features {missing}")
        numbers = [_feature_value(f"features.{name}", value[name]) for name in FEATURE_NAMES]
    else:
        raise ScoreRequestError(
            f"features must be an array of {len(FEATURE_NAMES)} numbers or an object keyed by feature name, "
            f"got {_json_type(value)}"
        )
    return np.array([numbers], dtype=np.float32)


def parse_transaction(value) -> TransactionRequest:
    """Validate a transaction event with the rules of the ``transactions`` topic.

    Raises:
        ScoreRequestError: the event is not an object or fails the event schema.
    """
    if type(value) is not dict:
        raise ScoreRequestError(f"transaction must be a JSON object (a transaction event), got {_json_type(value)}")
    batch = decode_transactions([orjson.dumps(value)])
    if batch.rejected:
        raise ScoreRequestError(f"invalid transaction: {batch.rejected[0].reason}")
    return TransactionRequest(
        transaction_id=int(batch.transaction_id[0]),
        event_time_ms=int(batch.event_time_ms[0]),
        customer_id=int(batch.customer_id[0]),
        terminal_id=int(batch.terminal_id[0]),
        amount=float(batch.amount[0]),
    )


def _feature_value(name: str, value) -> float:
    # bool is a subclass of int in Python, but true/false is not a feature value in JSON.
    if type(value) not in (int, float):
        raise ScoreRequestError(f"{name} must be a number, got {_json_type(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ScoreRequestError(f"{name} must be finite, got {value!r}")
    if abs(number) > _FLOAT32_MAX:
        raise ScoreRequestError(f"{name} is {value!r}, outside the float32 range the model takes (±{_FLOAT32_MAX:.4g})")
    return number


def _parse_transaction_id(request: dict) -> int | None:
    if "transaction_id" not in request:
        return None
    value = request["transaction_id"]
    if type(value) is not int or not 0 <= value <= MAX_ID:
        raise ScoreRequestError(f"transaction_id must be a non-negative 64-bit integer, got {value!r}")
    return value


def _raise_if_unknown_fields(request: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(request.keys() - set(allowed))
    if unknown:
        raise ScoreRequestError(f"unknown fields {unknown}; this form of request allows {list(allowed)}")


def _json_type(value) -> str:
    """Name the JSON type of a decoded value, for messages."""
    if value is None:
        return "null"
    if type(value) is bool:
        return "boolean"
    if type(value) in (int, float):
        return "number"
    if type(value) is str:
        return "string"
    if type(value) is list:
        return "array"
    return "object"
