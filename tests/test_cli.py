"""The training commands share their flags: same names, defaults, help and checks."""

import argparse

import pytest

from model import chat, classify, export, generate, instruct, score_responses, train
from model.training.cli import HelpFormatter, Recipe, add_training_command_arguments, check_args

COMMANDS = {"train": train, "classify": classify, "instruct": instruct}


def shared_actions() -> dict[str, argparse.Action]:
    """The flags the shared groups add, by dest, on a bare parser."""
    parser = argparse.ArgumentParser()
    recipe = Recipe(out_dir="x", epochs=1, batch_size=1, lr=1.0, eval_interval=1, drop_rate=0.0, start="x")
    add_training_command_arguments(parser, recipe)
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def test_training_commands_share_flags_with_one_name_default_and_help():
    shared = shared_actions()
    recipe_fields = {"out_dir", "epochs", "batch_size", "lr", "eval_interval", "eval_iters", "drop_rate"}
    assert {"backend", "seed", "out_dir", "no_progress", "data_dir", "lr", "weight_decay", "warmup_steps", "min_lr",
            "grad_clip", "precision", "epochs", "max_steps", "batch_size", "eval_interval", "eval_iters", "resume",
            "checkpoint", "hf_model", "hf_dir", "preset", "lora_rank", "lora_alpha"} <= set(shared)
    for name, module in COMMANDS.items():
        actions = {a.dest: a for a in module.build_parser()._actions}
        for dest, ref in shared.items():
            ours = actions[dest]
            assert ours.option_strings == ref.option_strings, (name, dest)
            assert ours.help == ref.help, (name, dest)
            assert (ours.type, ours.choices, ours.nargs) == (ref.type, ref.choices, ref.nargs), (name, dest)
            # A chapter's own values (learning rate, epochs, ...) are the one difference, and come from its recipe.
            expected = getattr(module.RECIPE, dest) if dest in recipe_fields else ref.default
            assert ours.default == expected, (name, dest)


@pytest.mark.parametrize("module", [train, classify, instruct, generate, score_responses, chat, export])
def test_help_shows_python_m_and_each_default_once(module, capsys):
    parser = module.build_parser()
    assert parser.prog == f"python -m {module.__name__}" and parser.formatter_class is HelpFormatter
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help:
            assert formatter._expand_help(action).count("default") <= 1, action.dest
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert capsys.readouterr().out.startswith(f"usage: python -m {module.__name__}")


@pytest.mark.parametrize("flags, message", [
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--grad-clip", "nan"], "--grad-clip must be > 0, got nan"),
    (["--drop-rate", "1"], "--drop-rate must be below 1"),
    (["--hf-dir", "d", "--context-length", "8"], "--context-length only applies to random initialisation"),
])
def test_numeric_flags_are_checked_in_one_place(flags, message, capsys):
    for module in COMMANDS.values():
        parser = module.build_parser()
        with pytest.raises(SystemExit) as info:
            check_args(parser, parser.parse_args(flags))
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_a_preset_brings_its_context_length(tmp_path):
    """--preset tiny trains at tiny's 64 tokens; only the recipe's own default preset runs at 256."""
    from model.training.run import RunContext, start_model

    for module in COMMANDS.values():
        parser = module.build_parser()
        ctx = RunContext(parser, parser.parse_args(["--preset", "tiny", "--out-dir", str(tmp_path)]))
        model, _ = start_model(ctx, module.RECIPE)
        assert model.config.context_length == 64


def test_scratchgpt_lists_its_commands_and_runs_each_commands_own_parser(capsys):
    from model import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "generate", "chat", "classify", "instruct", "score", "export"):
        assert f"\n  {command} " in out
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.startswith("scratchgpt ")
    for command, (module, _) in cli.COMMANDS.items():
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: python -m model.{module}")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["pretrain"])
    assert exit_info.value.code == 2 and "invalid choice: 'pretrain'" in capsys.readouterr().err
