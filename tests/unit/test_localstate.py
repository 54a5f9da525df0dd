"""The journal files: what is written can be read back, in the one JSON shape."""

import json

from sandboxd.control.localstate import LocalState, fields_json


def test_records_written_from_parts_are_the_json_of_the_whole(tmp_path):
    records = {
        "sb-b": {"state": "ready", "pool": "p", "handle": '{"pid":1}'},
        "sb-a": {"state": "claimed", "claimant": 'ünïcode "quoted"', "pool": "p"},
    }
    state = LocalState(tmp_path / "state")
    assert state.save_records({k: fields_json(v) for k, v in records.items()})
    text = (tmp_path / "state" / "records.json").read_text()
    assert text == json.dumps(records, sort_keys=True, separators=(",", ":"))
    assert LocalState(tmp_path / "state").load_records() == records
    # the same content again: not written again
    assert not state.save_records({k: fields_json(v) for k, v in records.items()})
    assert state.save_records({})
    assert LocalState(tmp_path / "state").load_records() == {}
