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


def test_every_bad_override_reported_at_once():
    with pytest.raises(CompressError) as e:
        load_config(["teacher=nope", "data.eval_size=x", "eval.nope=1", "+extra=1"])
    assert len(e.value.problems) == 4


def test_every_command_in_the_table_parses_and_runs_its_own_function(monkeypatch, capsys):
    from compress import cli

    positional = {"run": [], "presets": [], "eval": ["MODEL"], "report": ["RUN"], "check": ["RUN"], "bench": ["MODEL"],
                  "plan": [], "predict": ["FOLDER"], "serve": ["FOLDER"]}
    # each command's own test: tests/test_pipeline.py, test_report.py, test_plan.py, test_predict.py, test_serve.py, here
    assert set(cli.COMMANDS) == set(positional)
    for name, (_, help_) in list(cli.COMMANDS.items()):
        seen = []
        monkeypatch.setitem(cli.COMMANDS, name, (lambda args: seen.append(args) or 7, help_))
        assert main([name, *positional[name]]) == 7 and seen[0].command == name, name
    with pytest.raises(SystemExit) as e:
        main(["evaluate"])  # not a command
    assert e.value.code == 2 and "invalid choice: 'evaluate'" in capsys.readouterr().err
    assert main([]) == 2  # no command: the usage, and a failing exit code


def test_dry_run_prints_the_composed_config_and_runs_nothing(tmp_path, capsys):
    from omegaconf import OmegaConf

    from conftest import TINY

    capsys.readouterr()
    assert main(["run", "--dry-run", *TINY, "pipeline=evaluate", f"run.root={tmp_path}", "run.name=D"]) == 0
    cfg = OmegaConf.create(capsys.readouterr().out)
    assert (cfg.teacher.name, cfg.data.eval_size, cfg.run.name, list(cfg.pipeline.stages)) == \
        ("tiny-random", 40, "D", ["evaluate"])
    assert list(tmp_path.iterdir()) == []


def test_presets_command_lists_every_option_and_stage_once(capsys):
    from compress.stages import STAGES

    assert main(["presets"]) == 0
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in capsys.readouterr().out.splitlines()
            if line.startswith("│")]
    listed = [(r[0], r[1]) for r in rows if r[0]]  # a wrapped description continues on rows without group
    expected = [(g, o) for g, options in presets().items() for o in options] + [("stage", s) for s in STAGES]
    assert listed == expected
