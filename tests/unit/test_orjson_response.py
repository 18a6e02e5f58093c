"""ORJSONResponse writes the bytes that Starlette's JSONResponse writes."""

from __future__ import annotations

import pytest
from starlette.responses import JSONResponse

from moorage.api.http import ORJSONResponse

BODIES = [
    {"name": "acme/app", "tags": [f"tag-{i}" for i in range(100)]},
    {"name": "acme/app", "tags": []},
    {"repositories": ["a/b", "c/d_e.f-g"]},
    {"text": "".join(chr(code) for code in range(0x800))},
    {"text": "héllo wörld ✓ 😀 \u2028 \u2029 </script>"},
]


@pytest.mark.parametrize("body", BODIES)
def test_orjson_response_bytes(body: dict[str, object]) -> None:
    """The body and its headers equal JSONResponse's."""
    fast = ORJSONResponse(body, headers={"Link": "<x>"})
    plain = JSONResponse(body, headers={"Link": "<x>"})

    assert fast.body == plain.body
    assert fast.headers == plain.headers


def test_orjson_response_lone_surrogate() -> None:
    """A lone surrogate, which orjson rejects, fails as in JSONResponse."""
    body = {"text": "a\ud800b"}

    with pytest.raises(UnicodeEncodeError):
        JSONResponse(body)
    with pytest.raises(UnicodeEncodeError):
        ORJSONResponse(body)
