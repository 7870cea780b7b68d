"""Data-parallel training: a 2-process gloo run under torchrun equals one process with the whole batch."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastlatent.training import init_distributed, read_metrics
from fastlatent.training.distributed import dist_info

REPO_ROOT = Path(__file__).resolve().parents[1]

DDP_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from fastlatent.nn import VectorQuantize
    from fastlatent.training import Trainer

    out_dir, batch_size = sys.argv[1], int(sys.argv[2])

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            self.x = torch.randn(48, 8, generator=torch.Generator().manual_seed(7))
        def __len__(self):
            return len(self.x)
        def __getitem__(self, i):
            return self.x[i], i % 4

    class VQGAN(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(8, 4)
            self.vq = VectorQuantize(4, 16, decay=0.8)
            # Same statistics, never synchronised: shows the synced codebook isn't equal by luck.
            self.vq_local = VectorQuantize(4, 16, decay=0.8, sync_codebook=False)
            self.decoder = nn.Linear(4, 8)
            self.disc = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 1))
        def discriminator_parameters(self):
            return list(self.disc.parameters())
        def training_step(self, batch, step):
            x, _ = batch
            z = self.encoder(x)
            q, _, commitment = self.vq(z)
            self.vq_local(z.detach())
            out = self.decoder(q)
            rec = F.mse_loss(out, x)
            d_loss = torch.relu(1 - self.disc(x)).mean() + torch.relu(1 + self.disc(out.detach())).mean()
            return {"loss": rec + commitment - 0.1 * self.disc(out).mean(), "disc_loss": d_loss, "rec": rec}

    rank = int(os.environ.get("RANK", "0"))
    # Whole batches, then the same global batch as 2 accumulated micro-batches (DDP skips the gradient
    # all-reduce on the first; the codebook EMA still syncs on each).
    for name, micro_batch, accumulate in (("plain", batch_size, 1), ("accum", batch_size // 2, 2)):
        torch.manual_seed(0)
        model = VQGAN()
        trainer = Trainer(model, out_dir=os.path.join(out_dir, name, f"rank{rank}"), steps=6,
                          batch_size=micro_batch, grad_accum_steps=accumulate, lr=1e-2, weight_decay=0.01,
                          warmup_steps=2, ema_decay=0.9, log_every=1, checkpoint_every=3, seed=3,
                          progress=False, plots=False)
        trainer.fit(Data())
        torch.save({"state": model.state_dict(), "world_size": trainer.dist.world_size,
                    "ddp": trainer.ddp is not None, "ema": trainer.ema_model().state_dict()},
                   os.path.join(out_dir, name, f"final_rank{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()
""")


def _env():
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
    )
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


@pytest.mark.slow
def test_two_process_ddp_equals_single_process_full_batch(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ddp = subprocess.Popen(
        [*torchrun, str(script), str(ddp_dir), "4"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    single = subprocess.run(
        [sys.executable, str(script), str(single_dir), "8"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    ddp_out, _ = ddp.communicate(timeout=120)
    assert single.returncode == 0, single.stderr
    assert ddp.returncode == 0, ddp_out
    for run in ("plain", "accum"):
        _check_ddp_run(ddp_dir / run, single_dir / run)


def _check_ddp_run(ddp_dir, single_dir):
    rank0 = torch.load(ddp_dir / "final_rank0.pt", weights_only=True)
    rank1 = torch.load(ddp_dir / "final_rank1.pt", weights_only=True)
    alone = torch.load(single_dir / "final_rank0.pt", weights_only=True)
    assert rank0["world_size"] == rank1["world_size"] == 2 and rank0["ddp"]
    assert alone["world_size"] == 1 and not alone["ddp"]

    for name, value in alone["state"].items():
        if name.startswith("vq_local."):
            continue
        # Both ranks hold the same weights, and they are those of one process with the 8-sample batch.
        torch.testing.assert_close(rank0["state"][name], rank1["state"][name], rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(rank0["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    for name, value in alone["ema"].items():
        if not name.startswith("vq_local."):
            torch.testing.assert_close(rank0["ema"][name], value, rtol=1e-4, atol=1e-5, msg=f"ema {name}")
    # The unsynchronised control diverges across ranks after its last update; the synced codebook does not.
    local = "vq_local._codebook.embed"
    assert not torch.allclose(rank0["state"][local], rank1["state"][local], atol=1e-4)
    assert (rank0["state"]["vq._codebook.embed"] - alone["state"]["vq._codebook.embed"]).abs().max() < 1e-5

    # Only rank 0 writes; its metrics are averages over the ranks, i.e. the full-batch values.
    assert not (ddp_dir / "rank1").exists()
    ddp_records = read_metrics(ddp_dir / "rank0" / "metrics.jsonl")
    single_records = read_metrics(single_dir / "rank0" / "metrics.jsonl")
    assert [r["step"] for r in ddp_records] == list(range(1, 7))
    for a, b in zip(ddp_records, single_records):
        for key in ("loss", "rec", "disc_loss", "grad_norm", "disc_grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert sorted(p.name for p in (ddp_dir / "rank0" / "checkpoints").iterdir()) == [
        "step_00000003.pt",
        "step_00000006.pt",
    ]
    config = json.loads((ddp_dir / "rank0" / "trainer_config.json").read_text())
    assert config["batch_size"] * config["grad_accum_steps"] == 4  # per process: half the global batch


def test_single_process_needs_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.enabled, info.is_main) == (0, 1, False, True)
    assert not torch.distributed.is_initialized()


def test_torchrun_environment_errors(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR, MASTER_PORT not set; launch with torchrun"):
        init_distributed()
    assert dist_info().rank == 1 and dist_info().world_size == 2
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        init_distributed()


VQ_SYNC_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from fastlatent.nn import ResidualVQ, VectorQuantize

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial codebooks (DDP would broadcast them)
    # More dead codes than rows, and a different number of rows per process.
    vq = VectorQuantize(4, 64, decay=0.5, threshold_ema_dead_code=1.0).train()
    rvq = ResidualVQ(dim=4, num_quantizers=4, codebook_size=8, quantize_dropout=True, decay=0.5).train()
    torch.manual_seed(100 + rank)  # then each process draws its own randomness, as in real training
    for step in range(6):
        vq(torch.randn(5 + 3 * rank, 4))
        rvq(torch.randn(2, 6 + rank, 4))
    for name, tensor in (("vq", vq.embed.detach()), ("rvq", rvq.codebooks.detach())):
        gathered = [torch.empty_like(tensor) for _ in range(2)]
        dist.all_gather(gathered, tensor.contiguous())
        if not torch.equal(gathered[0], gathered[1]):
            print(f"{name} codebooks differ between processes", flush=True)
            sys.exit(1)
    dist.destroy_process_group()
    print("codebooks equal", flush=True)
""")


@pytest.mark.slow
def test_vq_dead_code_revival_and_quantize_dropout_stay_in_sync(tmp_path):
    script = tmp_path / "vq_sync.py"
    script.write_text(VQ_SYNC_SCRIPT)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and "codebooks equal" in run.stdout, run.stdout + run.stderr
