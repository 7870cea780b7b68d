"""The model commands' plumbing: options from config files, argument errors, image grids, --help."""

import json

import pytest
import torch

from fastlatent.cli import build_parser, main
from fastlatent.cli.options import apply_config_defaults, load_config_file
from fastlatent.recipes import resolve_device, save_grid

COMMANDS = ("train-ae", "train-prior", "sample", "reconstruct", "demo")


def _subparser(name):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[name]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_documents_every_option(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for action in _subparser(command)._actions:
        for flag in action.option_strings:
            assert flag in text
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help text"


def test_config_file_sets_defaults_and_command_line_wins(tmp_path):
    cfg = tmp_path / "ae.json"
    cfg.write_text(json.dumps({"steps": 7, "block-out-channels": [16, 32], "levels": "4,4", "mid_attention": True}))
    parser = _subparser("train-ae")
    apply_config_defaults(parser, load_config_file(cfg), str(cfg))
    args = parser.parse_args(["--out", "x", "--steps", "9"])
    assert args.steps == 9 and args.block_out_channels == [16, 32] and args.levels == [4, 4] and args.mid_attention
    toml = tmp_path / "ae.toml"
    toml.write_text('steps = 11\nquantizer = "vq"\n')
    parser = _subparser("train-ae")
    apply_config_defaults(parser, load_config_file(toml), str(toml))
    args = parser.parse_args(["--out", "x"])
    assert args.steps == 11 and args.quantizer == "vq"


@pytest.mark.parametrize("content, match", [
    ({"stepz": 3}, "unknown option"),
    ({"steps": 0}, "option steps"),
    ({"quantizer": "pq"}, "expected one of"),
    ({"mid_attention": "yes"}, "true or false"),
    ({"levels": "a,b"}, "comma-separated integers"),
])
def test_bad_config_files_are_reported(tmp_path, capsys, content, match):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps(content))
    with pytest.raises(SystemExit):
        main(["train-ae", "--out", str(tmp_path / "o"), "--config", str(cfg)])
    assert match in capsys.readouterr().err


def test_config_file_problems(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train-ae", "--out", "o", "--config", str(tmp_path / "missing.json")])
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(SystemExit):
        main(["train-ae", "--out", "o", "--config", str(bad)])
    assert "not valid JSON" in capsys.readouterr().err
    bad.write_text("[1, 2]")
    with pytest.raises(SystemExit):
        main(["train-ae", "--out", "o", "--config", str(bad)])
    assert "table/object" in capsys.readouterr().err


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="--device"):
        resolve_device("tpu:x")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_save_grid(tmp_path):
    from PIL import Image

    images = torch.linspace(-1, 1, 5 * 1 * 4 * 3).view(5, 1, 4, 3)
    path = save_grid(images, tmp_path / "g.png", nrow=2, scale=2, pad=1)
    with Image.open(path) as im:
        # 3 rows of 4 px + 4 pads, 2 columns of 3 px + 3 pads, doubled
        assert im.size == ((2 * 3 + 3) * 2, (3 * 4 + 4) * 2) and im.mode == "L"
        pixels = torch.from_numpy(__import__("numpy").asarray(im).astype("int64"))
    assert pixels[2, 2].item() == 0 and pixels[0, 0].item() == 255  # first pixel of image 0 is -1; padding white
    with pytest.raises(ValueError, match="images must be"):
        save_grid(torch.zeros(2, 2, 4, 4), tmp_path / "x.png", nrow=1)
