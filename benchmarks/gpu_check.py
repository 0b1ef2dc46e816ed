"""A short check of the GPU path of the training engine, for a machine with a CUDA GPU.

It trains a few steps of the digits U-Net under each mixed-precision mode (bf16 autocast, fp16 autocast with
a gradient scaler, float32), checks that every loss is finite and that the scaler ran, writes a checkpoint,
resumes it, and compares the resumed run with an uninterrupted one; then it loads the CUDA checkpoint on
the CPU and samples from both devices. Prints what it measured and exits non-zero on a failed check.

    python benchmarks/gpu_check.py
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffusion_course.nn import UNetConfig  # noqa: E402
from diffusion_course.training import TrainConfig, Trainer, load_checkpoint, sample_images  # noqa: E402

UNET = dict(image_size=16, in_channels=1, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
            attention_resolutions=(4,), norm_groups=8)


def trainer(amp: str, steps: int, out=None) -> Trainer:
    cfg = TrainConfig(dataset="digits", image_size=16, batch_size=64, lr=5e-4, steps=steps, amp=amp, device="cuda",
                      sample_every=0, checkpoint_every=0, out=out, progress=False)
    return Trainer(cfg, UNetConfig(**UNET))


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to check")
        return 1
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16 supported: {torch.cuda.is_bf16_supported()}")
    failures = []
    for amp in ("bf16", "fp16", "off"):
        t = trainer(amp, 200)
        t.train_step()  # warm-up (kernel selection)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses = t.train()
        torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        ok = all(torch.isfinite(torch.tensor(losses)))
        extra = f", scaler scale {t.scaler.get_scale():.0f}" if t.scaler.is_enabled() else ""
        print(f"amp {amp:>4}: autocast dtype {t.amp_dtype}, {len(losses) - 1} steps in {secs:.2f} s "
              f"({(len(losses) - 1) / secs:.0f} steps/s), first loss {losses[0]:.3f}, last 20 mean "
              f"{sum(losses[-20:]) / 20:.4f}{extra}")
        if not ok or sum(losses[-20:]) / 20 > 0.5 * losses[0]:
            failures.append(f"amp {amp}: loss did not fall or was not finite")
        if amp == "fp16" and not t.scaler.is_enabled():
            failures.append("fp16 ran without a gradient scaler")
    with tempfile.TemporaryDirectory() as tmp:
        full = trainer("bf16", 60)
        full.train()
        half = trainer("bf16", 60, out=tmp)
        half.train(30)
        half.save()
        resumed = trainer("bf16", 60)
        resumed.load(tmp)
        resumed.train()
        diff = max((a - b).abs().max().item() for a, b in zip(full.model.state_dict().values(),
                                                             resumed.model.state_dict().values()))
        print(f"resume on CUDA at step 30 of 60: largest weight difference to the uninterrupted run {diff:.3g} "
              f"(CUDA kernels are not all deterministic, so a small difference is expected)")
        if diff > 1e-2:
            failures.append(f"resumed run differs by {diff}")
        model_cpu, diffusion, _ = load_checkpoint(tmp, device="cpu")
        x_cpu = sample_images(model_cpu, diffusion, 8, "ddim", 20, seed=0, progress=False)
        model_gpu, _, _ = load_checkpoint(tmp, device="cuda")
        x_gpu = sample_images(model_gpu, diffusion, 8, "ddim", 20, seed=0, progress=False)
        dev = (x_cpu - x_gpu).abs().max().item()
        print(f"the CUDA checkpoint loads on the CPU; DDIM samples from the same noise, CPU vs GPU: largest difference {dev:.3g}")
        if dev > 0.1:
            failures.append(f"CPU and GPU samples differ by {dev}")
    print("peak GPU memory:", f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    for f in failures:
        print("FAILED:", f)
    print("all GPU checks passed" if not failures else f"{len(failures)} GPU check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
