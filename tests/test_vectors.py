"""Embedding vectors on the wire: base64 float32, shortening, the Embedded event."""

from __future__ import annotations

import numpy as np
import pytest

from config.errors import InvalidRequest
from config.contract import events
from models.vectors import from_base64, shorten, to_base64


def test_base64_roundtrip_is_exact_little_endian_float32():
    v = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    data = to_base64(v)
    assert np.array_equal(from_base64(data, 5), v)
    import base64
    assert base64.b64decode(data)[:4] == v[0, 0].astype("<f4").tobytes()


def test_shorten_renormalises_and_rejects_growth():
    v = np.array([[3.0, 4.0, 12.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    s = shorten(v, 2)
    np.testing.assert_allclose(s, [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)
    assert shorten(v, None) is v and shorten(v, 3) is v
    with pytest.raises(InvalidRequest) as e:
        shorten(v, 4)
    assert e.value.param == "dimensions"


def test_embedded_event_roundtrip_and_is_terminal():
    ev = events.Embedded(data=to_base64(np.ones((2, 3), np.float32)), count=2, dimensions=3,
                         prompt_tokens=9)
    first, back = events.decode(events.encode(4, [events.Started("w", 9), ev]))
    assert first == 4 and back[1] == ev
    assert isinstance(ev, events.TERMINAL)
