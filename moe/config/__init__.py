"""Experiment configs: the typed schema and the recipes of `configs/`.

Modules, from the bottom of the import graph to the top:
  schema: parsing a ConfigDict section into its dataclass, the one
    unknown-field check, value checks (`check_choice`, `check_int`,
    `check_number`), and the defaults of a dataclass as a ConfigDict.
  param_names: '/'-joined pytree leaf names and the regex rules matched
    against them (an unmatched regex is an error).
  experiment: `ExperimentConfig`, one typed section per top-level field,
    and `base_config()`, built from those sections' dataclasses.
  recipes: the building blocks of the config files in `configs/` (models,
    routers, the digits and mnist5k experiments, the V-MoE recipe, `runlocal`).

`schema` and `param_names` import nothing else from `moe`; `experiment` and
`recipes` import the modules whose sections they assemble, so import them
by module (this package imports none of them itself).
"""
