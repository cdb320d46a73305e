"""Registering a libvirt domain's VM row by hand (``libvirtDomain`` with the domain's uuid), and
the bad inputs of it; a member cannot mark a VM as a libvirt domain."""

from __future__ import annotations

import uuid

from tests.api.conftest import World


def test_a_libvirt_domain_is_registered_with_its_domain_uuid_and_bad_inputs_are_400(world: World) -> None:
    domain = str(uuid.uuid4())
    params = {"name": "dom", "hostUuid": world.host, "state": "Running", "libvirtDomain": True, "resourceUuid": domain}
    made = world.admin("POST", "/vm-instances", {"params": params})["inventory"]
    assert made["uuid"] == domain.replace("-", "") and made["libvirtDomain"] is True
    assert made["qmpSocket"] is None
    plain = world.admin("POST", "/vm-instances", {"params": {"name": "plain"}})["inventory"]
    assert plain["libvirtDomain"] is False
    for params in (
        {"name": "x", "libvirtDomain": "yes"},
        {"name": "x", "libvirtDomain": True},  # no resourceUuid
        {"name": "x", "libvirtDomain": True, "resourceUuid": "not-a-uuid"},
        {"name": "x", "libvirtDomain": True, "resourceUuid": domain},  # registered already
    ):
        status, answer = world.call("POST", "/v1/vm-instances", world.admin_key, {"params": params})
        assert (status, answer["error"]["code"]) == (400, "INVALID_ARGUMENT"), (params, answer)
    member = world.parties["own"].key
    status, answer = world.call(
        "POST", "/v1/vm-instances", member, {"params": {"name": "x", "libvirtDomain": True, "resourceUuid": domain}}
    )
    assert status == 403, answer
