"""Planted-bug controls for the CUDA emulator (tests/test_cuda_emulator_controls.py).

Each control is a copy of a real kernel source with one edit, made by setup.py when it builds
fastlatent._emu: the edited translation unit is compiled into its own namespace, and while the control
is active (fastlatent._emu.set_control) the op's binding launches it instead of the real kernels. An
edit that no longer matches its source fails the build of that control, so the controls cannot go
stale silently. Keep each `old` unique in its source.
"""

CONTROLS = [
    {  # tree reduction in shared memory with the barrier between its steps removed
        "name": "missing_syncthreads",
        "source": "ema_update_cuda.cu",
        "launch": "launch_ema_update_cuda",
        "params": "EmaUpdateParams",
        "old": "partial[threadIdx.x + stride];\n    __syncthreads();",
        "new": "partial[threadIdx.x + stride];",
    },
    {  # grid-stride loop over rows that runs one row past the end
        "name": "off_by_one_tail",
        "source": "code_stats_cuda.cu",
        "launch": "launch_code_stats_cuda",
        "params": "CodeStatsParams",
        "old": "threadIdx.x; i < n;",
        "new": "threadIdx.x; i <= n;",
    },
    {  # double-buffered cp.async weight tiles read without waiting for the tile in use
        "name": "missing_cp_async_wait",
        "source": "group_norm_conv_cuda.cu",
        "launch": "launch_group_norm_conv3x3_cuda",
        "params": "GroupNormConvParams",
        "old": "load_b(t + 1, static_cast<int>((t + 1) & 1));\n        cp_async_wait<1>();",
        "new": "load_b(t + 1, static_cast<int>((t + 1) & 1));",
    },
    {  # the vector path's 16-byte loads chosen without checking model_output's alignment
        "name": "misaligned_vector_load",
        "source": "sampler_step_cuda.cu",
        "launch": "launch_sampler_step_cuda",
        "params": "SamplerStepParams",
        "old": "p.n % kVector == 0 && aligned16(p.model_output) &&",
        "new": "p.n % kVector == 0 &&",
    },
]
