"""One vocabulary across the commands: shared flags read the same, and every command and option says what it is."""

from __future__ import annotations

import argparse

import pytest

from threedis.engine import cli
from threedis.engine.cli_args import SAM_DEFAULT, lora_arg
from threedis.engine.errors import ThreedisWarning


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def _undocumented(parser: argparse.ArgumentParser) -> list[str]:
    return [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions
            if not isinstance(a, argparse._HelpAction) and not a.help]


def test_every_command_and_option_says_what_it_is():
    from threedis.kernels.bench_attention import build_parser as bench_parser

    for name, parser in {**_commands(), "bench attention": bench_parser()}.items():
        assert parser.description, f"`threedis {name}` has no description"
        assert _undocumented(parser) == [], f"`threedis {name}`: options without help"


def test_shared_flags_read_the_same_in_every_command():
    commands = _commands()
    for name in ("render", "demo", "batch", "serve", "plan"):
        sam = _option(commands[name], "--sam")
        assert (sam.nargs, sam.const, sam.default, sam.metavar) == ("?", SAM_DEFAULT, None, "PATH_OR_ID"), name
    for name in ("render", "demo", "batch"):
        lora = _option(commands[name], "--lora")
        assert isinstance(lora, argparse._AppendAction) and lora.type is lora_arg, name
        assert lora.metavar == "PATH[:SCALE]", name
    for name in ("render", "demo", "batch", "serve", "plan", "depth"):
        assert _option(commands[name], "--depth-model") is not None, name
    profiles = {name: _option(p, "--profile").default for name, p in commands.items() if _option(p, "--profile")}
    assert set(profiles.values()) == {"auto"}, profiles
    assert {"render", "demo", "batch", "serve", "plan"} <= set(profiles)


def test_a_bare_sam_is_accepted_everywhere():
    parser = cli.build_parser()
    for argv in (["render", "l.json"], ["demo"], ["batch", "jobs.jsonl"], ["serve"], ["plan", "l.json"]):
        assert parser.parse_args([*argv, "--sam"]).sam == SAM_DEFAULT, argv
        assert parser.parse_args([*argv, "--sam", "/models/sam2"]).sam == "/models/sam2", argv


def test_loras_are_path_and_scale_everywhere_and_the_old_scale_flag_still_works():
    parser = cli.build_parser()
    args = parser.parse_args(["render", "l.json", "--lora", "a.safetensors:0.7", "--lora", "b.safetensors"])
    assert cli._loras(args) == [("a.safetensors", 0.7), ("b.safetensors", 1.0)]
    args = parser.parse_args(["render", "l.json", "--lora", "a.safetensors", "--lora-scale", "0.5"])
    with pytest.warns(ThreedisWarning, match="--lora-scale is deprecated: write --lora PATH:SCALE"):
        assert cli._loras(args) == [("a.safetensors", 0.5)]
    batch = parser.parse_args(["batch", "jobs.jsonl", "--lora", "a.safetensors:0.25"])
    assert batch.lora == [("a.safetensors", 0.25)]
    assert lora_arg("C:\\loras\\x.safetensors") == ("C:\\loras\\x.safetensors", None)  # a drive, not a scale
    with pytest.raises(argparse.ArgumentTypeError, match="finite"):
        lora_arg("x.safetensors:nan")


def test_the_depth_command_takes_the_estimator_as_render_does():
    parser = cli.build_parser()
    assert parser.parse_args(["depth", "p.jpg", "--depth-model", "/m"]).model == "/m"
    assert parser.parse_args(["depth", "p.jpg", "--model", "/m"]).model == "/m"  # the old spelling
