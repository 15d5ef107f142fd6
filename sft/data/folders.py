"""Which files a local source reads: a file itself, a glob's matches, or a folder's data files.

A folder is read whole: every data file in it (by extension, plain or compressed, recursively, in name order), each
read on its own, so that files of different formats and record formats mix as the samples of one file do. Its own
split layout is used only where the folder declares one, in this order:

1. a hub `README.md` whose front matter has a `configs:` section: the data files of the chosen config's split;
2. split subfolders (`train/`, `test/`, `validation/` and their usual synonyms): the files under the split's;
3. the hub's shard names (`train-00000-of-00003.parquet`, as `push_to_hub` writes them): the split's shards.

Words in other file names (`train_a.jsonl`, `chat-2024-test.jsonl`) mean nothing. The log lists the files read and
those skipped, with why. A `Dataset.save_to_disk` folder is no folder of files: `sft.data.rows` opens it.
"""

from __future__ import annotations

import glob
import logging
import re
from pathlib import Path
from typing import Any

from sft.data.files import DATA_EXTENSIONS, is_data_file_name
from sft.data.reading import DataError
from sft.data.sources import Source, glob_files

logger = logging.getLogger("sft.data")

# Split subfolder names, by the split they hold.
SPLIT_FOLDERS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z][\w.]*?)-\d{5}-of-\d{5}(\.|$)")
LOGGED_NAMES = 20  # files named in the log, read and skipped each; the rest counted


def is_save_to_disk(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()


def _readme_configs(folder: Path) -> list[dict[str, Any]] | None:
    """The `configs:` of a hub README.md's front matter, or None where it declares none."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    import yaml

    try:
        meta = yaml.safe_load(text[3:end] if end != -1 else text[3:])
    except yaml.YAMLError as error:
        raise DataError(readme, "", "configs", f"cannot read the front matter: {error}") from None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    return [c for c in configs if isinstance(c, dict)] or None if isinstance(configs, list) else None


def _config_splits(folder: Path, configs: list[dict[str, Any]], source: Source) -> dict[str, list[Path]]:
    """{split: files} of the README config the source names (`subset`), or of the default one."""
    names = [str(config.get("config_name", "default")) for config in configs]
    if source.subset is not None:
        if source.subset not in names:
            raise DataError(folder / "README.md", "", "configs", f"no config {source.subset!r} (configs: {names})")
        config = configs[names.index(source.subset)]
    else:
        defaults = [c for c, name in zip(configs, names) if c.get("default") or name == "default"]
        if len(defaults) != 1 and len(configs) != 1:
            message = f"several configs ({', '.join(names)}): name one as the source's subset in a data config"
            raise DataError(folder / "README.md", "", "configs", message)
        config = defaults[0] if defaults else configs[0]
    data_files = config.get("data_files", "**")
    base = folder / str(config.get("data_dir", ""))
    if isinstance(data_files, (str, list)) and all(isinstance(item, str) for item in _as_list(data_files)):
        data_files = [{"split": "train", "path": data_files}]
    splits: dict[str, list[Path]] = {}
    for entry in _as_list(data_files):
        if not isinstance(entry, dict) or "path" not in entry:
            raise DataError(folder / "README.md", "", "data_files", f"expected split and path, got {entry!r}")
        files = splits.setdefault(str(entry.get("split", "train")), [])
        for pattern in _as_list(entry["path"]):
            files += [Path(m) for m in sorted(glob.glob(str(base / pattern), recursive=True)) if Path(m).is_file()]
    return splits


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _folder_splits(folder: Path, data_files: list[Path], source: Source) -> tuple[dict[str, list[Path]], str] | None:
    """({split: files}, the layout's name) where the folder declares a split layout; None where it declares none."""
    configs = _readme_configs(folder)
    if configs is not None:
        return _config_splits(folder, configs, source), "the README.md configs"
    subfolders = {child.name.lower(): child for child in folder.iterdir() if child.is_dir()}
    by_folder = {
        split: [file for file in data_files if any(subfolders[n] in file.parents for n in names if n in subfolders)]
        for split, names in SPLIT_FOLDERS.items()
        if any(name in subfolders for name in names)
    }
    if by_folder:
        return by_folder, "split subfolders"
    shards: dict[str, list[Path]] = {}
    for file in data_files:
        match = SHARD_NAME.match(file.name)
        if match:
            shards.setdefault(match["split"], []).append(file)
    return (shards, "hub shard names") if shards else None


def _folder_files(folder: Path, source: Source) -> list[Path]:
    """The files of a folder source, the ones skipped logged with why."""
    data_files, skipped = [], []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            skipped.append((file, "hidden"))
        elif not is_data_file_name(file):
            skipped.append((file, f"not a data file: {', '.join(DATA_EXTENSIONS)}, plain or compressed"))
        else:
            data_files.append(file)
    layout = _folder_splits(folder, data_files, source)
    if layout is None:
        if source.split != "train" or source.subset is not None:
            wanted = f"split {source.split!r}" if source.subset is None else f"subset {source.subset!r}"
            raise DataError(
                folder, "", None, f"no {wanted}: the folder declares no splits (no README.md configs:, no train/ or "
                "test/ subfolders), so all its data files are one source; name files or a glob instead"
            )  # fmt: skip
        files = data_files
    else:
        splits, how = layout
        if source.split not in splits:
            raise DataError(folder, "", None, f"no split {source.split!r} in {how} (splits: {', '.join(splits)})")
        files = sorted(set(splits[source.split]))
        chosen = set(files)
        skipped += [(file, f"not in split {source.split!r} ({how})") for file in data_files if file not in chosen]
        logger.info("%s: split %r by %s", folder, source.split, how)
    if not files:
        raise DataError(folder, "", None, "no data file in this folder" + _skipped_text(folder, skipped))
    _log_files(folder, files, skipped)
    return files


def _names(folder: Path, files: list) -> str:
    shown = ", ".join(str(file.relative_to(folder)) for file in files[:LOGGED_NAMES])
    return shown + (f" and {len(files) - LOGGED_NAMES} more" if len(files) > LOGGED_NAMES else "")


def _skipped_text(folder: Path, skipped: list[tuple[Path, str]]) -> str:
    if not skipped:
        return ""
    shown = [f"{file.relative_to(folder)} ({why})" for file, why in skipped[:LOGGED_NAMES]]
    more = f" and {len(skipped) - LOGGED_NAMES} more" if len(skipped) > LOGGED_NAMES else ""
    return f"; skipped {len(skipped)}: " + ", ".join(shown) + more


def _log_files(folder: Path, files: list[Path], skipped: list[tuple[Path, str]]) -> None:
    hidden = [file for file, why in skipped if why == "hidden"]
    shown = [(file, why) for file, why in skipped if why != "hidden"]
    logger.info(
        "%s: reading %d file%s: %s%s%s",
        folder,
        len(files),
        "" if len(files) == 1 else "s",
        _names(folder, files),
        _skipped_text(folder, shown),
        f"; {len(hidden)} hidden file{'' if len(hidden) == 1 else 's'} skipped" if hidden else "",
    )


def local_files(source: Source) -> list[Path] | None:
    """The files of a file, glob or folder source, in the order read; None for a hub dataset id or a
    `save_to_disk` folder. A DataError for a missing file or a glob that matches none. Logs a folder's files."""
    path = Path(source.path)
    files = glob_files(source.path)
    if files is not None:
        if not files:
            raise DataError(source.path, "", None, "the glob matches no file")
        return files
    if path.is_file():
        return [path]
    if path.is_dir():
        return None if is_save_to_disk(path) else _folder_files(path, source)
    if is_data_file_name(path):
        raise DataError(path, "", None, "no such file")
    return None
