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
    cfg.write_text(
        json.dumps({"steps": 7, "block-out-channels": [16, 32], "levels": "4,4", "mid_attention": True})
    )
    parser = _subparser("train-ae")
    apply_config_defaults(parser, load_config_file(cfg), str(cfg))
    args = parser.parse_args(["--out", "x", "--steps", "9"])
    assert (
        args.steps == 9
        and args.block_out_channels == [16, 32]
        and args.levels == [4, 4]
        and args.mid_attention
    )
    toml = tmp_path / "ae.toml"
    toml.write_text('steps = 11\nquantizer = "vq"\n')
    parser = _subparser("train-ae")
    apply_config_defaults(parser, load_config_file(toml), str(toml))
    args = parser.parse_args(["--out", "x"])
    assert args.steps == 11 and args.quantizer == "vq"


@pytest.mark.parametrize(
    "content, match",
    [
        ({"stepz": 3}, "unknown option"),
        ({"steps": 0}, "option steps"),
        ({"quantizer": "pq"}, "expected one of"),
        ({"mid_attention": "yes"}, "true or false"),
        ({"levels": "a,b"}, "comma-separated integers"),
    ],
)
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
    assert (
        pixels[2, 2].item() == 0 and pixels[0, 0].item() == 255
    )  # first pixel of image 0 is -1; padding white
    with pytest.raises(ValueError, match="images must be"):
        save_grid(torch.zeros(2, 2, 4, 4), tmp_path / "x.png", nrow=1)


def test_command_errors_are_one_line_and_exit_status_2(tmp_path, capsys):
    assert main(["sample", "--pipeline", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastlatent sample: error: ") and "pipeline.json not found" in err
    assert "Traceback" not in err and "--debug" in err
    assert (
        main(
            [
                "train-ae",
                "--out",
                str(tmp_path / "ae"),
                "--quantizer",
                "lfq",
                "--codebook-size",
                "100",
                "--steps",
                "1",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "fastlatent train-ae: error: " in err and "power of 2" in err and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(OSError, match="pipeline.json not found"):
        main(["--debug", "sample", "--pipeline", str(tmp_path / "missing")])


def test_grid_rows_are_labelled(tmp_path):
    from PIL import Image

    images = torch.zeros(6, 1, 4, 4)
    plain = save_grid(images, tmp_path / "plain.png", nrow=3, scale=2)
    labelled = save_grid(
        images, tmp_path / "labelled.png", nrow=3, scale=2, row_labels=["original", "class 7"]
    )
    with Image.open(plain) as a, Image.open(labelled) as b:
        assert b.height == a.height and b.width > a.width
        margin = __import__("numpy").asarray(b)[:, : b.width - a.width]
    rows = margin.shape[0] // 2
    assert (margin[:rows] < 128).any() and (margin[rows:] < 128).any()  # ink in each row's label
    with pytest.raises(ValueError, match="one label per row"):
        save_grid(images, tmp_path / "x.png", nrow=3, row_labels=["only one"])
