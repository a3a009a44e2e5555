"""The model card (`README.md`) of an exported candidate: Hub metadata, then prose a reader can check.

The YAML front matter is written by huggingface_hub's `ModelCardData` (so the Hub reads it as it
reads any card): `base_model` lists the sources, `tags` carry `merge` and `evomerge`, and the
`model-index` holds one result per metric with the data set (task), split, number of examples
and the generation settings behind it, taken from the journal's measurement identities. The prose
says what was merged, how it was searched (space, optimizer, budget) and sets the candidate beside
its sources, their uniform average and the base on the held-out examples.
"""

from __future__ import annotations

import json
from typing import Any

from evomerge.config import Campaign

TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}\n"


def model_card(row: dict, campaign: Campaign, meta: dict, model_name: str, mergekit_note: str) -> str:
    """The card of journal row `row` (a dict); `meta` holds the journal's baselines, holdout_identity, sessions."""
    from huggingface_hub import ModelCard, ModelCardData

    recipe = row["recipe"]
    dataflow = "path" in recipe
    data = ModelCardData(
        model_name=model_name,
        base_model=list(campaign.sources.values()),
        tags=["merge", "evomerge", "dataflow-merge" if dataflow else recipe["method"]],
        library_name="transformers",
        pipeline_tag="text-generation",
        eval_results=_eval_results(row, meta.get("holdout_identity") or []) or None,
    )
    body = "\n".join([*_intro(row, campaign, model_name, dataflow), *_search(row, campaign),
                      *_holdout_table(row, campaign, meta.get("baselines") or {}),
                      *_reproduce(dataflow, mergekit_note)])
    return ModelCard.from_template(data, template_str=TEMPLATE, body=body).content


def _intro(row: dict, campaign: Campaign, model_name: str, dataflow: bool) -> list[str]:
    recipe = row["recipe"]
    how = (f"a layer path of {len(recipe['path'])} layers over the sources (data-flow merge)" if dataflow
           else f"`{recipe['method']}` with searched coefficients (parameter-space merge)")
    lines = [f"# {model_name}", "",
             f"A merge of {len(campaign.sources)} model(s), found by [evomerge](https://pypi.org/project/evomerge-search/)'s "
             f"evolutionary search (campaign `{campaign.name}`, candidate #{row['id']}): {how}.", "",
             "| role | model |", "|---|---|"]
    if campaign.base:
        lines.append(f"| base | `{campaign.base}` |")
    lines += [f"| source `{name}` | `{ref}` |" for name, ref in campaign.sources.items()]
    return lines


def _search(row: dict, campaign: Campaign) -> list[str]:
    space = campaign.search_space
    settings = ", ".join(f"{k}: {json.dumps(v)}" for k, v in space.items() if k != "kind")
    optimizer = ", ".join(f"{k}: {json.dumps(v)}" for k, v in campaign.optimizer.items() if k != "name")
    objectives = "; ".join(f"{o.name} ({o.direction}) = " + " + ".join(f"{w:g} x {m}" for m, w in o.metrics.items())
                           for o in campaign.objectives)
    fitness = ", ".join(f"{k} = {v:.4g}" for k, v in (row["objectives"] or {}).items())
    return ["", "## How it was searched", "",
            f"- Search space: `{space['kind']}` ({settings})",
            f"- Optimizer: `{campaign.optimizer['name']}`" + (f" ({optimizer})" if optimizer else "")
            + f", budget {campaign.budget} candidates, seed {campaign.seed}",
            f"- Objectives: {objectives}",
            "- Fitness tasks: " + ", ".join(f"`{s.get('task')}`" for s in campaign.fitness),
            f"- This candidate: #{row['id']} of generation {row['generation']}, fitness {fitness}"]


def _holdout_table(row: dict, campaign: Campaign, baselines: dict) -> list[str]:
    hold = {k: v for k, v in (row.get("holdout") or {}).items() if isinstance(v, (int, float))}
    if not hold:
        return ["", "## Held-out evaluation", "",
                "No held-out scores for this candidate (the campaign scores up to `holdout_max` front members "
                "on its `holdout` evaluators)."]
    from evomerge.view import holdout_rows

    columns, rows = holdout_rows(campaign, baselines)
    columns = [c for c in dict.fromkeys(columns + list(hold)) if c in hold]
    tasks = ", ".join(f"`{spec.get('task')}`" for spec in campaign.holdout)
    lines = ["", "## Held-out evaluation", "",
             f"Scored on examples never used for fitness, the same way for every row (held-out tasks: {tasks}).",
             "", "| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]

    def cells(scores: dict) -> str:
        return " | ".join(f"{scores[c]:.4f}" if isinstance(scores.get(c), (int, float)) else "-" for c in columns)

    for name, scores in rows:
        label = name if name in ("base", "uniform") else f"source `{name}`"
        if "error" in scores:
            lines.append(f"| {label} | " + " | ".join("-" for _ in columns) + " |")
        else:
            lines.append(f"| {label} | {cells(scores)} |")
    lines.append(f"| **this model** (#{row['id']}) | {cells(hold)} |")
    return lines


def _reproduce(dataflow: bool, mergekit_note: str) -> list[str]:
    lines = ["", "## Reproduce", "",
             "`evomerge_recipe.yaml` is the exact recipe: `evomerge merge evomerge_recipe.yaml OUT` rebuilds these "
             "weights from the same sources. `evomerge_scores.json` holds the candidate's scores with the identity "
             "of every measurement (task, split, examples, generation settings)."]
    if mergekit_note:
        lines += ["", mergekit_note]
    return lines


def _eval_results(row: dict, holdout_identity: list[dict]) -> list:
    """One EvalResult per scalar metric: fitness metrics from the row's identity, held-out ones from the campaign's."""
    from huggingface_hub import EvalResult

    results = []
    for split_scores, identities, kind in ((row.get("metrics") or {}, row.get("identity") or [], "fitness"),
                                            (row.get("holdout") or {}, holdout_identity, "held-out")):
        for ident in identities:
            for metric in ident.get("metrics", []):
                value = split_scores.get(metric)
                if not isinstance(value, (int, float)):
                    continue
                settings = {k: v for k, v in ident.items() if k not in ("task", "split", "n", "metrics")
                            and v not in (None, [], {})}
                results.append(EvalResult(
                    task_type="text-generation", dataset_type=str(ident.get("task")),
                    dataset_name=f"{ident.get('task')} ({kind})", dataset_split=str(ident.get("split")),
                    dataset_args={"num_examples": ident.get("n")}, metric_type=metric, metric_name=metric,
                    metric_value=round(float(value), 6), metric_args=_plain(settings) or None))
    return results


def _plain(value: Any) -> Any:
    """JSON-safe copy (the card's YAML takes plain mappings, lists and scalars only)."""
    return json.loads(json.dumps(value, default=str))
