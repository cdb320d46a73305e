"""Registering many volumes in one request: all or none, every item checked like a single
registration, errors naming the item."""

from __future__ import annotations

from tests.api.conftest import World


def items(world: World, count: int, folder: str = "bulk") -> list[dict[str, object]]:
    return [
        {"hostUuid": world.host, "installPath": f"{world.tmp}/{folder}/{number}.raw", "name": f"v{number}"}
        for number in range(count)
    ]


def test_thousands_of_volumes_in_one_request(world: World) -> None:
    status, answer = world.call("POST", "/v1/volumes", world.admin_key, {"params": {"volumes": items(world, 3000)}})
    assert status == 200, answer
    made = answer["inventories"]
    assert len(made) == 3000 and len({v["uuid"] for v in made}) == 3000
    assert made[7]["installPath"] == f"{world.tmp}/bulk/7.raw" and made[7]["format"] == "raw"
    status, answer = world.call("GET", "/v1/volumes", world.admin_key, q="installPath~=%/bulk/%", count="true")
    assert answer["total"] == 3000


def test_one_bad_item_registers_none(world: World) -> None:
    def refused(volumes: list[dict[str, object]], status: int, code: str, where: str, before: int = 0) -> None:
        got, answer = world.call("POST", "/v1/volumes", world.admin_key, {"params": {"volumes": volumes}})
        assert (got, answer["error"]["code"]) == (status, code), answer
        assert answer["error"]["description"].startswith(where), answer
        _, listed = world.call("GET", "/v1/volumes", world.admin_key, q="installPath~=%/none/%", count="true")
        assert listed["total"] == before  # none of them was registered

    good = items(world, 5, "none")
    refused([*good, {**good[0], "installPath": "/etc/cron.d/x.raw"}], 400, "PATH_NOT_ALLOWED", "volumes[5]")
    refused([*good, {**good[0], "hostUuid": "0" * 32}], 404, "NOT_FOUND", "volumes[5]: no host")
    refused([*good, good[1]], 409, "CONFLICT", "volumes[5]")
    refused([*good, {"installPath": "/x"}], 400, "INVALID_ARGUMENT", "volumes[5]")
    refused([*good, {**good[0], "type": "Root"}], 400, "INVALID_ARGUMENT", "volumes[5]")
    refused([*good, {**good[0], "format": "vmdk"}], 400, "INVALID_ARGUMENT", "volumes[5]")
    world.admin("POST", "/volumes", {"params": {"volumes": good[:1]}})
    refused([*good[1:], good[0]], 409, "CONFLICT", "volumes[4]", before=1)  # registered already
    for bad in ([], "x", [1, 2], [{}] * 5001):
        got, answer = world.call("POST", "/v1/volumes", world.admin_key, {"params": {"volumes": bad}})
        assert (got, answer["error"]["code"]) == (400, "INVALID_ARGUMENT"), bad
    member = world.parties["own"].key
    assert world.call("POST", "/v1/volumes", member, {"params": {"volumes": good}})[0] == 403
