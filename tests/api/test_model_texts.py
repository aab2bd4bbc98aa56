"""``GET /v1/models`` carries each model's name and description per language, next to
the English ``display_name`` and ``description`` that API clients already read."""

from __future__ import annotations

from tests.api.conftest import Api


async def test_models_are_listed_with_their_texts_in_english_and_chinese(api: Api) -> None:
    r = await api.client.get("/v1/models")
    assert r.status_code == 200, r.text
    tiny = {m["id"]: m for m in r.json()["data"]}["tiny-t2v"]
    assert tiny["display_name"] == tiny["display"]["en"]["name"] == \
        "Tiny T2V (random weights, CPU)"
    assert tiny["description"] == tiny["display"]["en"]["description"]
    assert tiny["display"]["zh"] == {
        "name": "微型 T2V（随机权重，CPU）",
        "description": "在本地生成的随机权重微型 Wan T2V 检查点；输出是噪声，但很快。"}
