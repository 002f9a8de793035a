from hiftune.errors import first_line


def test_first_line_of_an_error_message():
    assert first_line(ValueError("bad value\n  details")) == "bad value"
    # An empty message (e.g. a bare KeyError()) still gives one readable line, not an IndexError.
    assert first_line(KeyError()) == "KeyError"
