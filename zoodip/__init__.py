"""zoodip: forward-only personalization of quantized diffusion models (ZOODiP, CVPR 2025 workshop)."""

from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

#: The repository root: conf/, experiments/, sweeps/, eval/ and outputs/ live here.
ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"


def sweep_group(name: str) -> str:
    """W&B group of a sweep: its name and start time, read from the multirun dir (`<date>/<time>`)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        sweep_dir = Path(HydraConfig.get().sweep.dir)
    except (ImportError, ValueError):  # composed outside a Hydra run (tests, notebooks)
        return name
    return f"{name}-{sweep_dir.parent.name}_{sweep_dir.name}"


def subject_folder(dataset_dir: str, subject: str | None) -> str | None:
    """data.path's default: <dataset_dir>/<subject> (the DreamBooth layout), or unset without a subject."""
    return f"{dataset_dir}/{subject}" if subject else None


# `${zoodip_root:}` in the configs, so every command works from any working directory.
if not OmegaConf.has_resolver("zoodip_root"):
    OmegaConf.register_new_resolver("zoodip_root", lambda: str(ROOT))
    OmegaConf.register_new_resolver("zoodip_group", sweep_group)
    OmegaConf.register_new_resolver("zoodip_subject_folder", subject_folder)
    OmegaConf.register_new_resolver("zoodip_report_dir", lambda output, multirun: output or f"{multirun}/report")
    OmegaConf.register_new_resolver("zoodip_compare_dir", lambda output, multirun: output or f"{multirun}/compare")
