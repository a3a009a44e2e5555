"""Staged campaigns: the paper's PS+DFS, where one stage's winner becomes a model of the next.

    name: hybrid
    base: ./base
    sources: {ja: ./shisa, math: ./wizardmath, abel: ./abel}
    objectives, fitness, holdout, executor, seed, dtype: shared by every stage
    stages:
      - name: ps
        search_space: {kind: ps, method: dare_ties, ...}
        budget: 600
      - name: dfs
        base: null                               # a stage's fields replace the shared ones
        sources: {merged: "stage:ps", ja: ./shisa}   # stage:<name> is that stage's winner
        search_space: {kind: dfs, lead: merged, repeats: 3}
        budget: 600

Each stage is an ordinary campaign in DIR/<stage name>/ with its own journal, so it resumes
exactly. Between stages the winner (the best finished candidate on the first objective, by
fitness) is written to DIR/<stage>/winner/ atomically; a kill before, during or after that write
resumes to the same bytes, because the winner and its merge are deterministic, and the next
stage's journal checks the winner's fingerprint like any model's. `evomerge status`, `front`,
`export` and `resume` take DIR and speak for the stages.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

from evomerge.config import Campaign, config_diff, parse_campaign
from evomerge.errors import EvomergeError, check_keys

STAGE_KEYS = ("name", "sources", "base", "search_space", "optimizer", "budget", "racing", "holdout_max")
STAGE_REF = "stage:"
MARKER = "hybrid.json"  # the staged config, written when the campaign starts


def is_staged(data) -> bool:
    return isinstance(data, dict) and "stages" in data


def parse_stages(data: dict, origin: str = "config") -> list[tuple[str, dict]]:
    """(stage name, the stage's full campaign config), each checked as a campaign of its own."""
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise EvomergeError(f"config field 'stages': bad value {stages!r}; allowed: a list of stages, each "
                            "{name, search_space, budget, ...}")
    shared = {k: v for k, v in data.items() if k != "stages"}
    out: list[tuple[str, dict]] = []
    for i, stage in enumerate(stages):
        where = f"stages[{i}]"
        if not isinstance(stage, dict):
            raise EvomergeError(f"config field '{where}': bad value {stage!r}; allowed: a mapping "
                                "{name, search_space, budget, ...}")
        check_keys(stage, STAGE_KEYS, where)
        name = stage.get("name")
        if not isinstance(name, str) or not name.isidentifier():
            raise EvomergeError(f"config field '{where}.name': bad value {name!r}; allowed: a name like ps or dfs "
                                "(letters, digits, _)")
        if any(name == n for n, _ in out):
            raise EvomergeError(f"config field '{where}.name': two stages are named {name!r}")
        config = copy.deepcopy(shared)
        for key, value in stage.items():
            if key == "name":
                continue
            if value is None:
                config.pop(key, None)
            else:
                config[key] = copy.deepcopy(value)
        config["name"] = f"{shared.get('name', 'campaign')}/{name}"
        earlier = [n for n, _ in out]
        sources = config.get("sources")
        for src, ref in (sources.items() if isinstance(sources, dict) else []):
            if isinstance(ref, str) and ref.startswith(STAGE_REF) and ref[len(STAGE_REF):] not in earlier:
                raise EvomergeError(f"config field '{where}.sources.{src}': {ref!r} names no earlier stage "
                                    f"(earlier: {', '.join(earlier) or 'none'})")
        try:
            parse_campaign(config, f"{origin} {where}")
        except EvomergeError as exc:
            text = str(exc)
            raise EvomergeError(text.replace("config field '", f"config field '{where}.", 1)
                                if text.startswith("config field '") else text) from None
        out.append((name, config))
    return out


def stage_folder(folder: Path, name: str) -> Path:
    return folder / name


def final_folder(folder: str | Path) -> Path:
    """The campaign folder `status`, `front` and `export` read: a staged campaign's last started stage."""
    folder = Path(folder)
    marker = folder / MARKER
    if not marker.is_file():
        return folder
    stages = _read_marker(folder)
    started = [name for name, _ in stages if (stage_folder(folder, name) / "journal.sqlite").exists()]
    return stage_folder(folder, started[-1] if started else stages[0][0])


def _marker_data(folder: Path) -> dict:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError) as exc:
        raise EvomergeError(f"{folder / MARKER} cannot be read ({exc}); it holds the staged config: restore it, "
                            "or start again in a new --out folder") from None
    if not is_staged(data):
        raise EvomergeError(f"{folder / MARKER} holds no staged config; restore it, or start again in a new --out folder")
    return data


def _read_marker(folder: Path) -> list[tuple[str, dict]]:
    return parse_stages(_marker_data(folder), str(folder / MARKER))


class StagedRunner:
    def __init__(self, data: dict, folder: str | Path, progress: bool = True, origin: str = "config"):
        from evomerge.config import as_json

        self.data = as_json(data, origin)
        self.stages = parse_stages(self.data, origin)
        self.folder = Path(folder)
        self.progress = progress

    def _claim(self) -> None:
        """The folder holds this staged config (a new one is written atomically) or refuses another."""
        marker = self.folder / MARKER
        if marker.is_file():
            stored = _marker_data(self.folder)
            changes = config_diff(stored, self.data)
            if changes:
                raise EvomergeError(f"{self.folder} holds a staged campaign with a different config "
                                    f"({'; '.join(changes)}); resume it unchanged with `evomerge resume "
                                    f"{self.folder}`, or start the new config in a new --out folder")
            return
        if self.folder.exists() and not self.folder.is_dir():
            raise EvomergeError(f"--out {self.folder} is a file; pass a folder for the campaign")
        if (self.folder / "journal.sqlite").exists():
            raise EvomergeError(f"{self.folder} holds a single-stage campaign; start the staged config in a new "
                                "--out folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{MARKER}.", dir=self.folder)
        with os.fdopen(fd, "w") as f:
            json.dump(self.data, f, indent=2)
        os.replace(tmp, marker)

    def campaign(self, index: int) -> Campaign:
        """Stage `index` with `stage:<name>` replaced by the earlier stage's winner folder."""
        name, config = self.stages[index]
        config = copy.deepcopy(config)
        for src, ref in list(config.get("sources", {}).items()):
            if isinstance(ref, str) and ref.startswith(STAGE_REF):
                config["sources"][src] = str((stage_folder(self.folder, ref[len(STAGE_REF):]) / "winner").resolve())
        return parse_campaign(config, f"stages[{index}] ({name})")

    def run(self):
        from evomerge.campaign import CampaignRunner

        self._claim()
        outcome = None
        for i, (name, _) in enumerate(self.stages):
            if self.progress:
                print(f"stage {i + 1}/{len(self.stages)}: {name}", flush=True)
            folder = stage_folder(self.folder, name)
            outcome = CampaignRunner(self.campaign(i), folder, progress=self.progress).run()
            if i + 1 < len(self.stages):
                self.write_winner(folder)
        return outcome

    def write_winner(self, folder: Path) -> Path:
        """The stage's winner as a model folder, unless the same winner is already there."""
        from evomerge.export import choose_candidate, recipe_from_dict, write_recipe

        row = choose_candidate(folder)
        recipe = recipe_from_dict(row["recipe"], f"{folder} candidate #{row['id']}")
        out = folder / "winner"
        written = out / "evomerge_winner.json"
        if written.is_file():
            try:
                if json.loads(written.read_text()).get("recipe") == row["recipe"]:
                    return out
            except ValueError:
                pass
        note = json.dumps({"candidate": row["id"], "objectives": row["objectives"], "recipe": row["recipe"]}, indent=2)
        return write_recipe(recipe, out, overwrite=out.exists(), extra_files={"evomerge_winner.json": note},
                            exact=False)  # the weights the first stage scored


def runner_for(data: dict, folder: str | Path, progress: bool = True, origin: str = "config"):
    """A runner (`.run()` -> Outcome) for a config: staged, or a single campaign."""
    if is_staged(data):
        return StagedRunner(data, folder, progress, origin)
    from evomerge.campaign import CampaignRunner

    return CampaignRunner(parse_campaign(data, origin), folder, progress=progress)


def staged_status(folder: str | Path) -> list[str] | None:
    """One line per stage (None: not a staged campaign)."""
    from evomerge.journal import Journal
    from evomerge.view import load_view

    folder = Path(folder)
    if not (folder / MARKER).is_file():
        return None
    lines = []
    for name, config in _read_marker(folder):
        sub = stage_folder(folder, name)
        if not Journal.exists(sub):
            lines.append(f"stage {name}: not started")
            continue
        view = load_view(sub)
        best = ", ".join(f"{k} {v:.4g}" for k, v in view.best.items())
        lines.append(f"stage {name}: {view.evaluated}/{view.budget} candidates, {'done' if view.done else 'running or stopped'}"
                     + (f"; best {best}" if best else ""))
    return lines


def resume_staged(folder: str | Path, progress: bool = True, executor: dict | None = None):
    from evomerge.config import with_executor

    data = with_executor(_marker_data(Path(folder)), executor)
    return StagedRunner(data, folder, progress, str(Path(folder) / MARKER)).run()


def staged_folders(folder: str | Path) -> list[tuple[str, Path]]:
    """(stage name, its campaign folder) of the stages that have started, in order."""
    from evomerge.journal import Journal

    folder = Path(folder)
    return [(name, stage_folder(folder, name)) for name, _ in _read_marker(folder)
            if Journal.exists(stage_folder(folder, name))]


def is_staged_folder(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).is_file()

