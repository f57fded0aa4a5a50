import pytest

from custom.options import as_bool


@pytest.mark.parametrize("value", [True, 1, "true", "True", "TRUE", "1", "yes", " on "])
def test_true_spellings(value):
    assert as_bool(value, "overwrite") is True


@pytest.mark.parametrize("value", [False, 0, "false", "False", "FALSE", "0", "no", "off"])
def test_false_spellings(value):
    assert as_bool(value, "overwrite") is False


@pytest.mark.parametrize("value", ["flase", "", 2, -1, None, [True], 0.5, "truee"])
def test_anything_else_is_refused_with_the_option_name(value):
    with pytest.raises(ValueError, match=r"--resume must be true or false.*got"):
        as_bool(value, "resume")
