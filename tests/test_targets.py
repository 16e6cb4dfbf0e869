"""Every ``_target_`` goes through polmctl/targets.py: polmctl's own code and $POLMCTL_ALLOW_TARGETS
prefixes only, modules that run commands never, refused with the config key and how to allow it.

OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_targets.py
"""

from __future__ import annotations

import sys
import textwrap

import pytest

from polmctl.compose import compose_validated
from polmctl.errors import ConfigError
from polmctl.rollout.rewards import CombinedReward, length_penalty, resolve_reward
from polmctl.targets import check_target, resolve_target

pytestmark = pytest.mark.unit

HOSTILE = [
    ("subprocess.run", "subprocess module"),
    ("os.system", "os module"),
    ("builtins.eval", "builtins module"),
    ("posix.system", "posix module"),
    ("pickle.loads", "pickle module"),
    ("importlib.import_module", "importlib module"),
]


@pytest.fixture()
def no_allow_list(monkeypatch):
    monkeypatch.delenv("POLMCTL_ALLOW_TARGETS", raising=False)


@pytest.mark.parametrize("target, why", HOSTILE)
def test_command_running_targets_are_refused_even_when_their_prefix_is_allowed(monkeypatch, target, why):
    monkeypatch.setenv("POLMCTL_ALLOW_TARGETS", f"{target.split('.')[0]},tests")
    spec = {"_target_": target, "args": ["touch", "/tmp/polmctl-pwned"]}
    with pytest.raises(ConfigError, match=rf"^method\.rewards\[1\]\._target_: '{target}' is refused: the {why}"):
        CombinedReward.from_specs(["math_answer", spec])


def test_the_shell_command_never_runs(tmp_path, no_allow_list):
    marker = tmp_path / "pwned"
    with pytest.raises(ConfigError):
        resolve_reward({"_target_": "subprocess.run", "args": ["touch", str(marker)]}, "method.rewards[0]")
    assert not marker.exists()


def test_validation_refuses_a_target_before_anything_loads(no_allow_list):
    """``polmctl show`` / ``plan`` / ``run`` all validate first; the key names the list entry."""
    with pytest.raises(ConfigError, match=r"^method\.rewards\[1\]\._target_: 'subprocess\.run' is refused"):
        compose_validated(["recipe=grpo", "method.rewards=[math_answer,{_target_: subprocess.run, args: [ls]}]"])
    with pytest.raises(ConfigError, match=r"method\.rewards\[0\]\._target_: 'mypkg\.rewards\.f' is refused: .*"):
        compose_validated(["recipe=rloo", "method.rewards=[{_target_: mypkg.rewards.f}]"])


def test_an_unlisted_package_is_refused_saying_how_to_allow_it(no_allow_list):
    with pytest.raises(ConfigError) as info:
        check_target("mypkg.rewards.score", "method.rewards[0]._target_")
    assert "POLMCTL_ALLOW_TARGETS=mypkg polmctl" in str(info.value)
    check_target("polmctl.rollout.rewards.length_penalty", "k")  # the project's own code needs nothing


def test_an_alias_through_an_allowed_module_is_refused_by_what_it_is():
    """polmctl.targets imports os: the dotpath passes as written, the object it names does not."""
    with pytest.raises(ConfigError, match=r"'polmctl\.targets\.os\.system' \(which is posix\.system\) is refused"):
        resolve_target("polmctl.targets.os.system", "method.rewards[0]._target_")
    with pytest.raises(ConfigError, match="dunder attribute"):
        resolve_target("polmctl.rollout.rewards.math_answer.__globals__", "k")
    with pytest.raises(ConfigError, match=r"\(which is rich\.console\.Console\.print\) is refused"):
        resolve_target("polmctl.console.console.print", "k")


def test_prefixes_match_whole_module_names(monkeypatch):
    monkeypatch.setenv("POLMCTL_ALLOW_TARGETS", " mypkg , other")
    check_target("mypkg.rewards.f", "k")
    check_target("other.f", "k")
    with pytest.raises(ConfigError, match="is refused"):
        check_target("mypkgevil.f", "k")


def test_an_allowed_user_module_works(tmp_path, monkeypatch):
    package = tmp_path / "myrewards_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scoring.py").write_text(
        textwrap.dedent(
            """
            def shout(prompts, completions, **_):
                return [float(c.isupper()) for c in completions]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("POLMCTL_ALLOW_TARGETS", raising=False)
    spec = {"_target_": "myrewards_pkg.scoring.shout"}
    with pytest.raises(ConfigError, match="POLMCTL_ALLOW_TARGETS=myrewards_pkg"):
        resolve_reward(spec, "method.rewards[0]")
    assert "myrewards_pkg.scoring" not in sys.modules  # refused before it was imported
    monkeypatch.setenv("POLMCTL_ALLOW_TARGETS", "myrewards_pkg")
    combined = CombinedReward.from_specs([spec, {"name": "length_penalty", "kwargs": {"target": 2}}])
    total, parts = combined(["p", "q"], ["YES", "no"])
    assert parts["shout"].tolist() == [1.0, 0.0]
    assert total.tolist() == pytest.approx([1.0 - 0.5, 0.0])
    name, fn = resolve_reward({"_target_": "polmctl.rollout.rewards.length_penalty"})
    assert (name, fn) == ("length_penalty", length_penalty)
