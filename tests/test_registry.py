import pytest

from imgcls.errors import ConfigError
from imgcls.registry import Registry


def test_duplicate_name_is_a_programming_error() -> None:
    reg: Registry[int] = Registry("widget")
    reg.add("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", 2)


def test_unknown_name_lists_close_matches_first() -> None:
    reg: Registry[int] = Registry("architecture")
    for name in ("alexnet", "resnet18", "resnet50", "vgg11_bn"):
        reg.add(name, 0)
    with pytest.raises(ConfigError) as err:
        reg.get("resnet19")
    message = str(err.value)
    assert "unknown architecture 'resnet19'" in message
    assert "did you mean 'resnet18'" in message
    known = message.split("known: ")[1]
    assert known.index("resnet18") < known.index("alexnet")  # close matches lead
    assert "vgg11_bn" in known
