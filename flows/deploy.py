"""The deployments ``baton serve`` serves: one per recipe, whose parameters fit the Prefect UI's Run form, and
``baton/baton`` for ``baton submit``.

    baton/vlp-micro   recipe_path, artifacts   frozen (shown read-only): the recipe file and this serve's artifacts
                      overrides                dotted key=value strings, default none: Quick Run runs the recipe
                                               as shipped, Custom Run takes overrides
                      only                     stages to run (with what they need), a choice of the recipe's stages
                      track                    MLflow tracking, default on
                      cluster                  a Ray address, default empty: the stages as Ray tasks there
    baton/baton       the whole resolved recipe as a parameter (``baton submit`` sends it)

A run of a per-recipe deployment resolves the recipe when it starts and records the result as its
``recipe_snapshot`` parameter (flows.pipeline.resolve_recipe): the UI's Retry reruns exactly that recipe.
The Prefect server validates a Run form against the schema, so an unknown stage in ``only`` is refused before
a flow run exists.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.recipe import Recipe, RecipeError, load_recipe

SUBMIT_DEPLOYMENT = "baton"  # flow/deployment name: baton/baton
FORM_ONLY = ("overrides", "only", "track", "cluster")  # what a person sets; the flow's others: hidden or frozen
FROZEN = ("recipe_path", "artifacts")


def recipe_files(named: list[Path], configs_dir: Path) -> tuple[list[tuple[Path, Recipe]], list[str]]:
    """([(path, recipe)] for every recipe in ``configs_dir`` and every one ``named``, [why a configs_dir file
    was skipped]). A named file that is not a valid recipe raises ``RecipeError`` (before anything starts); a
    file under ``configs_dir`` that is not one (a sweep file) is skipped with its reason."""
    found: dict[Path, Recipe] = {}
    skipped: list[str] = []
    for path in sorted(configs_dir.glob("*.yaml")):
        try:
            found[path.resolve()] = load_recipe(path)
        except RecipeError as e:
            skipped.append(f"{path}: {str(e).splitlines()[0]}")
    for path in named:
        if not path.is_file():
            raise RecipeError(f"serve {path}: no such recipe file")
        found[path.resolve()] = load_recipe(path)
    by_name: dict[str, Path] = {}
    for path in found:
        if path.stem == SUBMIT_DEPLOYMENT or path.stem in by_name:
            other = by_name.get(path.stem, f"the deployment baton/{SUBMIT_DEPLOYMENT}")
            raise RecipeError(f"serve {path}: its deployment would be named baton/{path.stem}, like {other}: "
                              f"rename one of the files")
        by_name[path.stem] = path
    return list(found.items()), skipped


def form_schema(schema: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    """The flow's parameter schema cut to the Run form: ``overrides``, ``only`` (a choice of the recipe's
    stages) and ``track``, plus the frozen recipe path and artifacts dir; recipe_snapshot and force hidden."""
    props = schema["properties"]

    def field(name: str, **kw: Any) -> dict[str, Any]:
        return {"title": name} | kw

    fields = {
        "recipe_path": field("recipe_path", description="the recipe this deployment runs"),
        "artifacts": field("artifacts", description="the artifact root of this `baton serve`"),
        "overrides": field("overrides", type="array", items={"type": "string"}, default=[],
                           description="dotted key=value, e.g. stages.vqa.train.lr=3e-4 (none: the recipe as "
                                       "shipped)"),
        "only": field("only", type="array", items={"type": "string", "enum": list(recipe.stages)}, default=[],
                      description="run only these stages and what they need (none: every stage)"),
        "track": field("track", type="boolean", default=True, description="track the run in MLflow"),
        "cluster": field("cluster", type="string", default="",
                         description="a Ray cluster to run the stages on: ray://HOST:10001, HOST:6379, auto or local "
                                     "(empty: on this serving machine); README: Running on a cluster")}
    for k in FROZEN:  # shown read-only, with freeze()'s value as the only choice
        fields[k] |= {"type": "string", "readOnly": True, "enum": props[k]["enum"]}
    keep = {k: v | {"position": i} for i, (k, v) in enumerate(fields.items())}
    return schema | {"properties": keep, "required": list(FROZEN)}


def recipe_deployment(flow, path: Path, recipe: Recipe, art: Path):
    """The deployment baton/<file stem> of one recipe (a RunnerDeployment for ``prefect.serve``)."""
    from prefect.utilities.annotations import freeze

    dep = flow.to_deployment(
        name=path.stem, enforce_parameter_schema=True, tags=["baton", recipe.name],
        parameters={"recipe_path": freeze(str(path)), "artifacts": freeze(str(art)), "overrides": [], "only": [],
                    "track": True, "cluster": ""},
        description=f"Recipe {path} ({len(recipe.stages)} stages: {', '.join(recipe.stages)}), artifacts in {art}. "
                    f"Quick Run runs it as the file says; Custom Run takes overrides (dotted key=value), the "
                    f"stages to run (only) and whether to track in MLflow. The flow run records the recipe it "
                    f"resolved (parameter recipe_snapshot): Retry reruns exactly that.")
    schema = form_schema(dep._parameter_openapi_schema.model_dump(), recipe)
    dep._parameter_openapi_schema = type(dep._parameter_openapi_schema).model_validate(schema)
    return dep


def submit_deployment(flow):
    """baton/baton: the whole resolved recipe as a parameter (``baton submit``)."""
    return flow.to_deployment(
        name=SUBMIT_DEPLOYMENT, enforce_parameter_schema=False,
        description="baton recipe runs: `baton submit CONFIG` (or the UI's Run with the same parameters); the "
                    "per-recipe deployments have a form")


def serve_deployments(recipes: list[tuple[Path, Recipe]], art: Path, limit: int | None) -> None:
    """Serve baton/baton and one deployment per recipe until stopped; each flow run executes in a fresh process
    that loads the flow by its entrypoint (relative to the project root, made the working directory here)."""
    import os

    from prefect import serve as prefect_serve

    from flows.entry import baton_pipeline

    deps = [submit_deployment(baton_pipeline)] + [recipe_deployment(baton_pipeline, p, r, art) for p, r in recipes]
    os.chdir(Path(__file__).resolve().parents[1])
    for dep in deps:
        dep.entrypoint = "flows/entry.py:baton_pipeline"
    prefect_serve(*deps, limit=limit, print_starting_message=False)
