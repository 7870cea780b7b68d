"""The recipes are the commands' options: same fields, same defaults, callable without argparse."""

import dataclasses

import pytest
import torch

from fastlatent.cli import build_parser
from fastlatent.cli.commands import recipe_from_args
from fastlatent.recipes import AutoencoderRecipe, PriorRecipe, SamplingOptions, train_prior
from fastlatent.selftest import SELFTESTS, run_selftest


@pytest.mark.parametrize(
    "argv, cls, required",
    [
        (["train-ae", "--out", "o"], AutoencoderRecipe, dict(out="o")),
        (["train-prior", "--out", "o", "--autoencoder", "a"], PriorRecipe, dict(out="o", autoencoder="a")),
        (["sample", "--pipeline", "p"], SamplingOptions, {}),
    ],
)
def test_command_defaults_are_the_recipe_defaults(argv, cls, required):
    args = build_parser().parse_args(argv)
    assert recipe_from_args(cls, args) == cls(**required)


def test_every_command_option_is_a_recipe_field():
    args = vars(build_parser().parse_args(["train-ae", "--out", "o"]))
    fields = {f.name for f in dataclasses.fields(AutoencoderRecipe)}
    assert set(args) - fields == {"command", "config", "func", "commands", "debug"}


def test_train_prior_needs_an_autoencoder(tmp_path):
    with pytest.raises(ValueError, match="--autoencoder"):
        train_prior(PriorRecipe(out=tmp_path))


@pytest.mark.parametrize("name, check", SELFTESTS, ids=[name for name, _ in SELFTESTS])
def test_selftest_check_passes_on_cpu(name, check):
    ok, detail = check(torch.device("cpu"), torch.float32)
    assert ok, f"{name}: {detail}"


def test_run_selftest_reports_a_line_per_check():
    lines = []
    checks = [
        ("always", lambda device, dtype: (True, "fine")),
        ("never", lambda device, dtype: (False, "broken")),
    ]
    assert not run_selftest([torch.device("cpu")], [torch.float32], report=lines.append, checks=checks)
    assert len(lines) == 2 and "ok" in lines[0] and "FAIL" in lines[1] and "broken" in lines[1]
