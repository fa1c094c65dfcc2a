"""The data stage: Open Assistant trees and TRL-style datasets -> SFT examples and preference pairs.

``build_data`` is what ``rlhfkit data build`` runs. Later stages read its folder with
``datasets.load_from_disk(DIR / "sft")`` / ``(DIR / "pairs")``, take PPO prompts from
``prompts_from_data_dir`` (and PPO-ptx's demonstrations from ``demonstrations_from_data_dir``) and key their caches on ``data_fingerprint``.
"""

from rlhfkit.data.build import DataBuildConfig, build_data, load_sources
from rlhfkit.data.corpus import Corpus
from rlhfkit.data.formats import FORMATS, detect_format
from rlhfkit.data.output import PAIR_COLUMNS, data_fingerprint, demonstrations_from_data_dir, features, prompts_from_data_dir
from rlhfkit.data.sources import open_source
from rlhfkit.data.split import assign_splits

__all__ = [
    "PAIR_COLUMNS",
    "FORMATS",
    "Corpus",
    "DataBuildConfig",
    "assign_splits",
    "build_data",
    "data_fingerprint",
    "demonstrations_from_data_dir",
    "detect_format",
    "features",
    "load_sources",
    "open_source",
    "prompts_from_data_dir",
]
