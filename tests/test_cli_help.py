"""Every option of every `flamingo` subcommand says what it does in --help, and the commands that run a
model agree on their device default."""

from __future__ import annotations

import argparse

from flamingo_vlm.cli import build_parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """name -> parser, for every subcommand at any depth (``convert openflamingo``)."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                found.update({f"{name} {k}": v for k, v in subcommands(sub).items()})
    return found


def test_every_option_of_every_subcommand_has_help():
    parsers = subcommands(build_parser())
    assert {"demo", "train", "eval", "serve", "generate", "info", "bench", "convert"} <= set(parsers)
    undocumented = [
        f"flamingo {name} {action.option_strings[0] if action.option_strings else action.dest}"
        for name, parser in parsers.items()
        for action in parser._actions
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
        and not (action.help and action.help.strip() and action.help != argparse.SUPPRESS)
    ]
    assert not undocumented, "options without help text:\n" + "\n".join(undocumented)


def test_commands_that_load_a_model_take_backbone_overrides_and_share_the_device_default():
    parsers = subcommands(build_parser())
    for name in ("serve", "eval", "generate"):
        options = {s for a in parsers[name]._actions for s in a.option_strings}
        assert {"--lm", "--vision", "--device"} <= options, name
        device = next(a for a in parsers[name]._actions if "--device" in a.option_strings)
        assert device.default is None and "default: cuda if available, else cpu" in device.help, name
