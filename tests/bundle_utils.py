"""Helpers shared by the bundle-level tests: config paths, tiny overrides, a tiny phantom dataset."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundle" / "configs"

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
