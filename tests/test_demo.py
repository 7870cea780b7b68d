"""The model commands end to end with a few steps: wiring, files written, metrics sane, errors clear."""

import json

import pytest

from fastlatent.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_demo_quick_writes_everything(tmp_path):
    from fastlatent.demo import run_demo

    metrics = run_demo(tmp_path, "fsq", quick=True, progress=False, samples_per_class=2)
    for name in (
        "reconstructions.png",
        "samples.png",
        "metrics.json",
        "report.md",
        "autoencoder/config.json",
        "pipeline/pipeline.json",
        "train/metrics.jsonl",
        "train-prior/metrics.jsonl",
    ):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["classifier"]["samples"] == 20 and 0 <= saved["classifier"]["sample_accuracy"] <= 1
    assert saved["autoencoder"]["codebook_size"] == 125 and saved["autoencoder"]["psnr_db"] > 0
    assert metrics["quick"] is True
    report = (tmp_path / "report.md").read_text()
    assert "PSNR" in report and "perplexity" in report and "samples.png" in report


@pytest.mark.slow
def test_commands_chain_with_a_config_file(tmp_path, capsys):
    config = tmp_path / "ae.toml"
    config.write_text(
        'quantizer = "kl"\nsteps = 3\nbatch-size = 8\nblock-out-channels = [8, 16]\n'
        "norm-num-groups = 4\nlog-every = 1\ncheckpoint-every = 2\n"
    )
    ae_dir, prior_dir = tmp_path / "ae", tmp_path / "prior"
    assert main(["train-ae", "--config", str(config), "--out", str(ae_dir), "--no-progress"]) == 0
    ae_metrics = json.loads((ae_dir / "autoencoder_metrics.json").read_text())
    assert "psnr_db" in ae_metrics and "codebook_size" not in ae_metrics
    assert (
        main(
            [
                "train-prior",
                "--autoencoder",
                str(ae_dir / "autoencoder"),
                "--out",
                str(prior_dir),
                "--prior",
                "unet",
                "--width",
                "16",
                "--depth",
                "2",
                "--steps",
                "2",
                "--batch-size",
                "8",
                "--sample-steps",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (prior_dir / "samples.png").is_file()
    assert (
        main(
            [
                "sample",
                "--pipeline",
                str(prior_dir / "pipeline"),
                "--labels",
                "3,7",
                "--sample-steps",
                "2",
                "--out",
                str(tmp_path / "s.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "s.png").is_file()
    assert (
        main(
            [
                "reconstruct",
                "--autoencoder",
                str(prior_dir / "pipeline"),
                "--limit",
                "4",
                "--out",
                str(tmp_path / "r.png"),
            ]
        )
        == 0
    )
    assert '"images": 4' in capsys.readouterr().out
    with pytest.raises(ValueError, match="classes must be in"):
        main(
            [
                "--debug",
                "sample",
                "--pipeline",
                str(prior_dir / "pipeline"),
                "--labels",
                "12",
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
    with pytest.raises(ValueError, match="--prior gpt"):
        main(
            [
                "--debug",
                "train-prior",
                "--autoencoder",
                str(ae_dir / "autoencoder"),
                "--out",
                str(tmp_path / "p2"),
                "--prior",
                "gpt",
                "--steps",
                "1",
            ]
        )


@pytest.mark.slow
def test_train_ae_dgae_and_reconstruct(tmp_path, capsys):
    out = tmp_path / "dgae"
    assert (
        main(
            [
                "train-ae",
                "--quantizer",
                "dgae",
                "--out",
                str(out),
                "--steps",
                "2",
                "--batch-size",
                "8",
                "--block-out-channels",
                "8,16",
                "--norm-num-groups",
                "4",
                "--decode-steps",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    config = json.loads((out / "autoencoder" / "config.json").read_text())
    assert config["class"] == "DiffusionDecoderAutoencoder" and config["config"]["decode_steps"] == 2
    assert (
        main(
            [
                "reconstruct",
                "--autoencoder",
                str(out / "autoencoder"),
                "--limit",
                "3",
                "--out",
                str(tmp_path / "r.png"),
            ]
        )
        == 0
    )
    assert '"images": 3' in capsys.readouterr().out
    with pytest.raises(ValueError, match="--disc-weight"):
        main(
            [
                "--debug",
                "train-ae",
                "--quantizer",
                "dgae",
                "--out",
                str(tmp_path / "x"),
                "--steps",
                "1",
                "--disc-weight",
                "0.5",
            ]
        )
