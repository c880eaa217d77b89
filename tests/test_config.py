"""Configs: every shipped YAML validates; bad keys, types and ranges raise ConfigError naming the key."""

from pathlib import Path

import pytest

from pwfn.errors import ConfigError
from pwfn.model.config import (
    PWFN_FRACTIONS,
    WFN_FRACTIONS,
    RunConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_shipped_configs_exist_and_validate():
    names = {p.stem for p in CONFIGS}
    assert {"digits_mlp", "mnist5k_lenet5", "mnist_lenet5", "cifar10_resnet20", "imagenet_resnet18",
            "imagenet_deit_tiny"} <= names
    for path in CONFIGS:
        cfg = load_config(path)
        assert isinstance(cfg, RunConfig)
        assert cfg.pwfn.fractions[-1] == 1.0


def test_defaults_are_the_papers_schedules():
    cfg = load_config(None)
    assert cfg.pwfn.fractions == PWFN_FRACTIONS
    assert cfg.wfn.fractions == WFN_FRACTIONS
    # the paper's lam; tau and k are the scaled, guarded defaults' (the paper's: config "paper_pwfn")
    assert cfg.pwfn.tau == 0.5 and cfg.pwfn.lam == 2.0**-11 and cfg.pwfn.k == 2.0
    assert cfg.pwfn.engine.b == 7 and cfg.pwfn.engine.max_order == 4


def test_dump_then_load_round_trip(tmp_path):
    cfg = load_config(CONFIGS[0], ["pwfn.k=2.5", "data.batch_size=32", "wfn.fractions=[0.5, 1.0]"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert config_to_dict(again) == config_to_dict(cfg)
    assert again.pwfn.k == 2.5 and again.data.batch_size == 32 and again.wfn.fractions == [0.5, 1.0]


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"pwfn\.lamda.*Did you mean 'lam'"):
        config_from_dict({"pwfn": {"lamda": 0.1}})
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'.*'model'"):
        config_from_dict({"modle": {"name": "mlp"}})


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("pwfn.fractions=[0.5, 0.4, 1.0]", "strictly increasing"),
        ("pwfn.fractions=[0.5, 1.5]", "outside"),
        ("wfn.fractions=[0.2, 0.9]", "last fraction must be 1.0"),
        ("pwfn.fractions=[]", "empty"),
        ("pwfn.sigma_floor=-1", "sigma_floor"),
        ("pwfn.k=0", "pwfn.k"),
        ("pwfn.engine.b=40", "pwfn.engine.b"),
        ("wfn.delta=1.5", "wfn.delta"),
        ("data.batch_size=0", "batch_size"),
        ("pwfn.objective=kl", "objective"),
        ("method=not a name", "method"),
        ("data.batch_size=abc", "expected an integer"),
        ("pwfn.lr=[1]", "expected a number"),
        ("progress=maybe", "true/false"),
        ("data=3", "mapping"),
        ("baseline.grad_clip=-1", "baseline.grad_clip"),  # a negative clip norm flips the gradients
        ("baseline.grad_clip=0", "baseline.grad_clip"),
        ("baseline.momentum=-0.5", "baseline.momentum"),
        ("baseline.momentum=1.5", "baseline.momentum"),
        ("baseline.weight_decay=-1", "baseline.weight_decay"),
    ],
)
def test_bad_values_raise_config_error_naming_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["pwfn.k"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(None, ["data.name=digits", "data.name.x=1"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pwfn: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_numbers_given_for_text_fields_are_read_as_text():
    cfg = load_config(None, ["name=2024", "data.root=123"])
    assert cfg.name == "2024" and cfg.data.root == "123"
    with pytest.raises(ConfigError, match="expected a string"):
        load_config(None, ["name=true"])  # a YAML boolean is not a name


def test_an_unknown_method_is_refused_by_the_registry_naming_the_closest(tmp_path):
    """A config names its method freely (a method may be registered after the config is read); the
    registry refuses an unknown one before anything runs, with the methods and the closest match."""
    from pwfn.cli import main as cli_main
    from pwfn.methods import check_method_name

    cfg = load_config(None, ["method=wfn_publihsed"])
    with pytest.raises(ConfigError, match=r"unknown method 'wfn_publihsed'.*Did you mean 'wfn_published'"):
        check_method_name(cfg.method)
    assert cli_main(["-q", "run", "--out", str(tmp_path), "--set", "method=pwfnn"]) == 2
    assert not any(tmp_path.iterdir())
