"""A sync round trip through the Python client generated from the spec.

Run by tests/integration/python_client.rs as `python roundtrip.py URL TOKEN`, with the
generated package `mana_sync_client` on PYTHONPATH. It pushes an insert, an
update with per-field timestamps and a delete, pulls them back page by page
following `syncedUntil`, and reads a refused push as the typed error body:
every check is made on the client's typed models, so a spec that lets them
drift from what the server sends fails here.
"""

import sys
from datetime import datetime

from mana_sync_client import AuthenticatedClient
from mana_sync_client.api.sync import pull, push
from mana_sync_client.models import (
    ChangeInput,
    ChangeInputDataType0,
    ChangeInputFieldsType0,
    ErrorBody,
    ErrorCode,
    FieldChange,
    Op,
    PushRequest,
    SyncResponse,
)
from mana_sync_client.types import UNSET

APP, TABLE = "todo", "todos"


def check_typed(response):
    """`response` parsed as a SyncResponse with nothing the spec leaves out."""
    assert isinstance(response, SyncResponse), response
    assert response.additional_properties == {}, response.additional_properties
    for change in response.server_changes:
        assert change.additional_properties == {}, change.additional_properties
    return response


def insert(id, **data):
    return ChangeInput(table=TABLE, id=id, op=Op.INSERT, data=ChangeInputDataType0.from_dict({"id": id, **data}))


def send(client, device, *changes):
    """Pushes `changes` as `device`; the server's answer, typed."""
    return push.sync(APP, client=client, body=PushRequest(client_id=device, changes=list(changes)))


def pulled(client, since=UNSET, limit=UNSET):
    return check_typed(pull.sync(APP, client=client, collection=TABLE, since=since, limit=limit))


def main(url, token):
    client = AuthenticatedClient(base_url=url, token=token, raise_on_unexpected_status=True)

    check_typed(
        send(
            client,
            "laptop",
            insert("t1", title="Buy milk", done=False, updatedAt="2026-01-01T10:00:00.000Z"),
            insert("t2", title="Walk the dog", updatedAt="2026-01-01T10:00:00.000Z"),
        )
    )
    # From another device: a newer title, an older `done` (which loses to
    # the insert's, field by field), and t2 deleted.
    fields = ChangeInputFieldsType0.from_dict(
        {
            "title": {"value": "Buy oat milk", "updatedAt": "2026-01-01T10:05:00Z"},
            "done": {"value": True, "updatedAt": "2026-01-01T09:00:00Z"},
        }
    )
    assert isinstance(fields["title"], FieldChange)
    check_typed(
        send(
            client,
            "phone",
            ChangeInput(table=TABLE, id="t1", op=Op.UPDATE, fields=fields),
            ChangeInput(table=TABLE, id="t2", op=Op.DELETE, deleted_at=datetime.fromisoformat("2026-01-01T10:06:00Z")),
        )
    )

    everything = pulled(client)
    assert not everything.has_more
    assert everything.conflicts == []
    t1, t2 = everything.server_changes
    assert (t1.table, t1.id, t1.op) == (TABLE, "t1", Op.INSERT), t1
    assert t1.data.to_dict() == {
        "id": "t1",
        "title": "Buy oat milk",
        "done": False,
        "updatedAt": "2026-01-01T10:05:00.000Z",
    }, t1.data
    assert (t2.table, t2.id, t2.op) == (TABLE, "t2", Op.DELETE), t2
    assert t2.data is UNSET and t2.fields is UNSET, t2
    assert datetime.fromisoformat(t2.deleted_at) == datetime.fromisoformat("2026-01-01T10:06:00Z"), t2

    # One record a page: the cursor of the first page leads to the second,
    # which ends where the whole pull did. Cursors go back as the strings
    # they came as: a datetime would drop their nanoseconds, and an earlier
    # cursor brings changes again.
    first = pulled(client, limit=1)
    assert first.has_more
    assert [c.id for c in first.server_changes] == ["t1"]
    second = pulled(client, since=first.synced_until, limit=1)
    assert [c.id for c in second.server_changes] == ["t2"]
    assert second.synced_until == everything.synced_until
    assert not pulled(client, since=second.synced_until).has_more

    # Nothing new after the cursor, until the next push.
    after = pulled(client, since=everything.synced_until)
    assert after.server_changes == [] and not after.has_more, after

    # An update without fields is refused, typed as the error body; the
    # batch is all or nothing, so its valid insert is not recorded either.
    refused = send(
        client,
        "laptop",
        insert("t3", title="Never recorded", updatedAt="2026-01-01T11:00:00Z"),
        ChangeInput(table=TABLE, id="t1", op=Op.UPDATE),
    )
    assert isinstance(refused, ErrorBody), refused
    # The code is typed: a member of the spec's ErrorCode enum.
    assert refused.code is ErrorCode.MISSING_FIELDS, refused
    assert pulled(client, since=everything.synced_until).server_changes == []

    # A device that follows cursors sees the next push, and only it.
    check_typed(send(client, "laptop", insert("t3", title="Call mum", updatedAt="2026-01-01T12:00:00Z")))
    (t3,) = pulled(client, since=everything.synced_until).server_changes
    assert (t3.id, t3.op, t3.data["title"]) == ("t3", Op.INSERT, "Call mum"), t3

    print("python client round trip: ok")


if __name__ == "__main__":
    main(*sys.argv[1:])
