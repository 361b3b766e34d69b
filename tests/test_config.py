import pytest

from compress.cli import main
from compress.config import config_dir, load_config, presets
from compress.errors import CompressError


def test_default_job_is_the_embedded_one():
    cfg = load_config([])
    assert (cfg.teacher.name, cfg.student.name, cfg.data.name) == ("smollm2-135m", "smollm2-slim", "rotten_tomatoes")
    assert cfg.teacher.trust_remote_code is False and cfg.student.keep_layers == list(range(10))


def test_group_override_selects_the_file():
    cfg = load_config(["teacher=llama7b", "student=tinyllama", "run.name=exp1"])
    assert cfg.teacher.hub_id == "meta-llama/Llama-2-7b-hf"
    assert cfg.student.hub_id == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert cfg.run.name == "exp1"


def test_every_preset_composes_and_has_a_description():
    for group, options in presets().items():
        assert options, group
        for option, description in options.items():
            assert description, f"{group}/{option} has no description"
            load_config([f"{group}={option}"])


def test_configs_ship_inside_the_package():
    d = config_dir()
    assert (d / "config.yaml").is_file() and (d / "teacher" / "smollm2-135m.yaml").is_file()


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(CompressError) as e:
        load_config(["teacher=llama8b"])
    msg = e.value.render()
    assert "teacher='llama8b'" in msg and "llama7b" in msg and "tiny-random" in msg


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(CompressError) as e:
        load_config(["eval.batchsize=4"])
    assert "unknown key" in e.value.render() and "batch_size" in e.value.render()


def test_wrong_type_names_key_and_type():
    with pytest.raises(CompressError) as e:
        load_config(["data.eval_size=many"])
    assert "data.eval_size='many'" in e.value.render() and "Integer" in e.value.render()


def test_every_bad_override_reported_at_once():
    with pytest.raises(CompressError) as e:
        load_config(["teacher=nope", "data.eval_size=x", "eval.nope=1", "+extra=1"])
    assert len(e.value.problems) == 4


def test_cli_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("run", "presets", "eval", "report", "check", "bench"):
        assert command in text


def test_presets_command_lists_groups_and_stages(capsys):
    assert main(["presets"]) == 0
    text = capsys.readouterr().out
    for word in ("teacher", "smollm2-135m", "tiny-random", "rotten_tomatoes", "bigbench", "jsonl", "evaluate"):
        assert word in text
