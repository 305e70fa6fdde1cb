from alignforge.evaluate.parsing import parse_json_output


def test_fenced_trailing_and_python_literals():
    assert parse_json_output('Sure:\n```json\n{"a": 1}\n```\nBye').value == {"a": 1}
    assert parse_json_output('```\n{"a": 1}\n```').value == {"a": 1}
    assert parse_json_output('{"a": 1} and then {junk').value == {"a": 1}
    assert parse_json_output("{'a': 'it\\'s', 'b': True, 'c': None}").value == {
        "a": "it's",
        "b": True,
        "c": None,
    }
    assert parse_json_output('{"a": [1, 2,],}').value == {"a": [1, 2]}
    assert parse_json_output('noise {"a": "}"} noise').value == {"a": "}"}


def test_junk_never_raises():
    for junk in ["", "   ", "no json here", '{"a": [1, 2', "{{{{", "```json\n", None, "{'a': x}"]:
        r = parse_json_output(junk)
        assert r.value is None and r.error, junk
