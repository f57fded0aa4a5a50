"""Helpers shared by the bundle-level tests: config paths, tiny overrides, a tiny phantom dataset, tiny weights."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundle" / "configs"

#: Timeout of every subprocess a test launches (a whole workflow): CI's limit is 90 minutes, and a shorter one only
#: fails a busy machine, it does not find a bug (a hang shows as the CI timeout anyway).
SUBPROCESS_TIMEOUT = 3000

#: Overrides that make any workflow run in seconds on a 2-core CPU: a 2-feature net, the smallest useful patch,
#: a coarse grid, one short epoch.
TINY = {
    "features": 2,
    "patch_size": [100, 100, 92],
    "target_spacing": [6.0, 6.0, 6.0],
    "max_epochs": 1,
    "epoch_length": 2,
    "batch_size": 1,
    "samples_per_volume": 1,
    "num_workers": 0,
    "val_interval": 1,
    "val_max_cases": 1,
    "cache_rate": 0.0,
    "train#augment#translation": 4,
}


def config_files(*names: str) -> list[str]:
    return [str(CONFIGS / n) for n in names]


def write_tiny_dataset(folder: Path, n_train: int = 3, n_test: int = 1, seed: int = 0, **kw) -> Path:
    from tools.phantom import write_dataset

    return Path(write_dataset(folder, n_train=n_train, n_test=n_test, seed=seed, preset="tiny", **kw))


def bundle_cli(configs, overrides: dict, launcher: list[str] | None = None) -> list[str]:
    """``python -m monai.bundle run --config_file [...] --key value ...`` as the argument list a user would type;
    ``launcher`` replaces ``python -m`` (e.g. torchrun)."""
    import json
    import sys

    cmd = [
        *(launcher or [sys.executable, "-m"]),
        "monai.bundle",
        "run",
        "--config_file",
        json.dumps(config_files(*configs)),
    ]
    for k, v in overrides.items():
        cmd += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    return cmd


def tiny_network(out_channels: int = 8, seed: int = 0, kaiming: bool = True, force_class: int | None = None, **kw):
    """A ``ValidUNet3D`` of ``TINY["features"]`` features seeded with ``seed``: Kaiming-normal convolutions (PyTorch's
    default init gives near-constant outputs through a deep narrow net) and, with ``force_class``, a head bias of
    1e4 on that class, so it wins everywhere the network runs. ``kw`` goes to ``ValidUNet3D``."""
    import torch

    from custom.network import ValidUNet3D

    torch.manual_seed(seed)
    net = ValidUNet3D(**{"in_channels": 1, "out_channels": out_channels, "features": TINY["features"], **kw})
    if kaiming:
        for m in net.modules():
            if isinstance(m, torch.nn.Conv3d | torch.nn.ConvTranspose3d):
                torch.nn.init.kaiming_normal_(m.weight)
    if force_class is not None:
        with torch.no_grad():
            net.head.conv.bias.zero_()
            net.head.conv.bias[force_class] = 1e4
    return net


def save_tiny_weights(path: Path, **kw) -> Path:
    """:func:`tiny_network` (``kw``) saved as ``{"network": state_dict}``, the bundle's weights format."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"network": tiny_network(**kw).state_dict()}, path)
    return path


def run_inference(inputs: Path | None, out: Path, weights: Path, files: list[str] | None = None, **over):
    """``files`` (default ``common.json`` + ``inference.json``) run in this process with the tiny network, ``weights``
    for both stages and a non-overlapping stage 2 (no logging.conf: pytest keeps the log records); ``over`` overrides.
    ``inputs=None`` leaves ``input`` to the configs (``evaluate.json``: the dataset's test list).
    """
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=files or config_files("common.json", "inference.json"),
        workflow_type=None,
        logging_file=False,
        **{
            **{k: TINY[k] for k in ("features", "patch_size", "target_spacing")},
            **({} if inputs is None else {"input": str(inputs)}),
            "output_dir": str(out),
            "stage1_weights": str(weights),
            "stage2_weights": str(weights),
            "stage2_overlap": 1,
            **over,
        },
    )
    wf.initialize()
    wf.run()
    return wf
