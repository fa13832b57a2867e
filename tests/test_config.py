from pathlib import Path

import pytest

from evalctx.config import load_suite, parse_suite
from evalctx.errors import UsageError

SUITE = Path(__file__).parent / "data" / "suites" / "fake_small.toml"


def _parse(data: dict) -> object:
    return parse_suite(data, "x.toml", "x")


def test_load_suite_resolves_depth_grids() -> None:
    suite = load_suite(str(SUITE))
    assert suite.name == "fake_small"
    assert [t.task for t in suite.tasks] == ["passkey", "niah_single"]
    assert suite.tasks[1].depths == [0.0, 0.5, 1.0]
    assert suite.tasks[0].seed == 3


@pytest.mark.parametrize("data, needle", [
    ({"tasks": [{"task": "passkey", "lengths": [100]}], "bogus": 1}, "unknown key"),
    ({"tasks": [{"task": "passkey", "lengths": [100], "lenghts": [1]}]}, "unknown key"),
    ({"tasks": [{"task": "nope", "lengths": [100]}]}, "nope"),
    ({"tasks": [{"task": "passkey"}]}, "lengths"),
    ({"tasks": [{"task": "passkey", "lengths": [0]}]}, "positive"),
    ({"tasks": [{"task": "passkey", "lengths": [100], "samples": 0}]}, "samples"),
    ({"tasks": [{"task": "passkey", "lengths": [100], "prompt_mode": "xml"}]}, "prompt_mode"),
    ({"tasks": [{"task": "passkey", "lengths": [100], "depths": [50]}]}, "fraction"),
    ({"tasks": []}, "at least one"),
])
def test_bad_suites_are_one_line_errors(data: dict, needle: str) -> None:
    with pytest.raises(UsageError) as exc:
        _parse(data)
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_suite() -> None:
    with pytest.raises(UsageError, match="suite not found"):
        load_suite("does-not-exist")
