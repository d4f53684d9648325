"""The W&B sweep file, read and checked: which train options it searches and over which Optuna
distributions, the configurations a grid or random search runs, the metric, the pruning.

W&B's search constraints become Optuna's distributions; none of them is drawn by code of ours:

    values: [...]                        CategoricalDistribution (a grid takes every value, in the file's order)
    value: x                             a constant, the same in every configuration
    uniform, int_uniform                 FloatDistribution(min, max), IntDistribution(min, max)
    q_uniform                            FloatDistribution(min, max, step=q) (IntDistribution for an int option)
    log_uniform_values                   FloatDistribution(min, max, log=True)
    log_uniform                          FloatDistribution(e^min, e^max, log=True)  (min, max: exponents)
    inv_log_uniform_values               FloatDistribution(min, max, log=True)  (1/X is log-uniform, so X is)
    inv_log_uniform                      FloatDistribution(e^-max, e^-min, log=True)
    q_log_uniform_values, q 1, integers  IntDistribution(min, max, log=True)

The others (normal, q_normal, log_normal, q_log_normal, beta, q_beta, other quantised log-uniforms, unequal
categorical probabilities) have no counterpart in Optuna: each gets one error line, never a substitute.
`early_terminate: {type: hyperband, min_iter, eta}` is W&B's rule (after epoch min_iter, min_iter * eta,
..., a run continues only if its metric is among the best 1/eta of the runs that got that far), which is
Optuna's successive-halving pruner.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from tl_dist.config import Config, parse_args

# W&B's top-level keys (docs.wandb.ai, "Sweep configuration options").
SWEEP_KEYS = ("program", "entity", "project", "description", "name", "method", "metric", "parameters",
              "early_terminate", "command", "run_cap")
METHODS = ("grid", "random", "bayes")
# What the sweep decides for each run itself, so not a parameter.
NOT_PARAMETERS = ("output_dir", "resume", "eval_only", "config")
DEFAULT_METRIC = ("val/accuracy", "maximize")
RANKABLE = ("val/loss", "val/accuracy", "val/top5_accuracy", "train/loss")
TRAIN_LOSS = "train/loss"
HYPERBAND_KEYS = ("type", "min_iter", "max_iter", "s", "eta", "strict")
NO_COUNTERPART = ("normal", "q_normal", "log_normal", "q_log_normal", "beta", "q_beta")
DISTRIBUTIONS = ("constant", "categorical", "uniform", "int_uniform", "q_uniform", "log_uniform",
                 "log_uniform_values", "inv_log_uniform", "inv_log_uniform_values", "q_log_uniform",
                 "q_log_uniform_values", *NO_COUNTERPART)


class SweepError(ValueError):
    """The sweep file or the sweep's options cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Pruning:
    """W&B's hyperband early termination: runs are compared after epoch `min_epochs`, then every `eta` times
    as many epochs; each time only the best 1/eta of them continue."""
    min_epochs: int
    eta: int

    def pruner(self):
        import optuna

        return optuna.pruners.SuccessiveHalvingPruner(min_resource=self.min_epochs, reduction_factor=self.eta,
                                                      min_early_stopping_rate=0)


@dataclass
class Sweep:
    path: Path
    name: str
    method: str
    space: dict  # train option (underscores) -> its Optuna distribution, in the file's order
    constants: dict  # train option -> its one value (`value:`)
    metric: str
    goal: str  # minimize | maximize
    run_cap: int | None
    pruning: Pruning | None = None
    project: str | None = None
    entity: str | None = None
    notes: tuple[str, ...] = ()  # how the file is read where it leaves a choice (a metric without a goal)
    identity: str = ""  # what defines the search (method, parameters, metric, early_terminate), as JSON

    @property
    def order(self) -> list[str]:
        """Every parameter (underscores), in the file's order."""
        return list(json.loads(self.identity)["parameters"])

    def options(self, params: dict) -> dict:
        """A configuration's train options: the searched values and the constants, in the file's order."""
        values = {**self.constants, **params}
        return {name: values[name] for name in self.order if name in values}

    def varying(self) -> list[str]:
        """The parameters whose value can differ between configurations, from the file alone (the run
        folders they name then stay the same, whatever the run count)."""
        from optuna.distributions import CategoricalDistribution

        return [name for name, d in self.space.items()
                if not (isinstance(d, CategoricalDistribution) and len(d.choices) == 1)]

    def count(self, runs: int | None) -> int:
        """How many configurations the sweep runs: `runs` (--runs) or the file's run_cap, a grid at most its
        size; random and bayes need one of them."""
        cap = runs or self.run_cap
        if self.method == "grid":
            size = math.prod(len(d.choices) for d in self.space.values())
            return min(size, cap) if cap else size
        if not cap:
            raise SweepError(f"{self.path}: method {self.method} draws until stopped in W&B; here give its number "
                             "of runs: run_cap: N in the file, or --runs N")
        return cap

    def planned(self, seed: int, count: int) -> list[dict]:
        """The searched values of the first `count` configurations of a grid (the file's order, the last
        parameter fastest) or a random search (Optuna's random sampler seeded with `seed`: the same file and
        seed give the same configurations, and a longer run starts with the shorter one's). Bayes plans
        nothing: each configuration is chosen from the results before it."""
        if self.method == "grid":
            combos = itertools.product(*(d.choices for d in self.space.values()))
            return [dict(zip(self.space, combo)) for combo in itertools.islice(combos, count)]
        if self.method == "random":
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            draws = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
            return [draws.ask(self.space).params for _ in range(count)]
        return []


def train_options() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Config)
            if not f.metadata.get("internal") and f.name not in NOT_PARAMETERS}


def option_kind(name: str) -> str:
    """int, float, str or bool: the type of a train option's value."""
    return train_options()[name].type.split(" |")[0]


# ---------------------------------------------------------------- reading the file


def read_sweep(path: str | Path) -> Sweep:
    import yaml

    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SweepError(f"cannot read the sweep file {path} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(spec, dict):
        raise SweepError(f"{path} holds no mapping of W&B sweep keys ({', '.join(SWEEP_KEYS)})")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {', '.join(unknown)}; a W&B sweep file has {', '.join(SWEEP_KEYS)}")
    method = spec.get("method")
    if method not in METHODS:
        raise SweepError(f"{path}: method {method!r}: use one of {', '.join(METHODS)}")
    metric, goal, notes = _metric(path, spec.get("metric"))
    run_cap = spec.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or isinstance(run_cap, bool) or run_cap < 1):
        raise SweepError(f"{path}: run_cap must be a positive integer, got {run_cap!r}")
    pruning = _pruning(path, spec.get("early_terminate"))
    if (method == "bayes" or pruning) and metric == TRAIN_LOSS:
        raise SweepError(f"{path}: {'bayes' if method == 'bayes' else 'early_terminate'} chooses on validation "
                         f"numbers, not on {TRAIN_LOSS}: set metric to one of {', '.join(RANKABLE[:3])}")
    parameters = spec.get("parameters")
    space, constants = _parameters(path, parameters, method)
    identity = json.dumps({"method": method, "parameters": {str(k).replace("-", "_"): v for k, v in parameters.items()},
                           "metric": metric, "goal": goal, "early_terminate": spec.get("early_terminate")},
                          sort_keys=False, default=str)
    return Sweep(path, str(spec.get("name") or path.stem), method, space, constants, metric, goal, run_cap, pruning,
                 spec.get("project"), spec.get("entity"), notes, identity)


def _metric(path: Path, metric) -> tuple[str, str, tuple[str, ...]]:
    if metric is None:
        return (*DEFAULT_METRIC, ())
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
        raise SweepError(f"{path}: metric must be {{name: ..., goal: minimize|maximize}}, got {metric!r}")
    name, goal = metric["name"], metric.get("goal")
    if name.split("/")[0] in ("test", "finetuned", "baseline"):
        raise SweepError(f"{path}: metric {name}: the test split is never used to choose; rank on one of "
                         f"{', '.join(RANKABLE)} (val/... needs --val-fraction)")
    if name not in RANKABLE:
        raise SweepError(f"{path}: metric {name!r} is not one a run reports; use one of {', '.join(RANKABLE)}")
    if goal not in (None, "minimize", "maximize"):
        raise SweepError(f"{path}: metric goal {goal!r}: use minimize or maximize")
    notes = () if goal else (f"metric {name} has no goal: minimizing it, as W&B does; add `goal: maximize` "
                             "to the file for an accuracy",)
    return name, goal or "minimize", notes


def _pruning(path: Path, early_terminate) -> Pruning | None:
    """W&B's hyperband settings as the first epoch of comparison and eta. With max_iter and s, W&B compares
    after max_iter / eta^k epochs for k = s, ..., 1 (rounded down, at least 1): the first of them."""
    if not early_terminate:
        return None
    where = f"{path}: early_terminate"
    if not isinstance(early_terminate, dict) or early_terminate.get("type") != "hyperband":
        raise SweepError(f"{where} must be {{type: hyperband, min_iter: N, eta: M}} (W&B's only kind), got "
                         f"{early_terminate!r}")
    unknown = sorted(set(early_terminate) - set(HYPERBAND_KEYS))
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {', '.join(unknown)}; hyperband takes {', '.join(HYPERBAND_KEYS)}")
    eta = early_terminate.get("eta", 3)
    if not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and eta >= 2 and float(eta).is_integer()):
        raise SweepError(f"{where}: eta {eta!r}: Optuna's pruner keeps the best 1/eta with a whole eta of 2 or more")
    eta = int(eta)

    def whole(key: str) -> int:
        value = early_terminate[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SweepError(f"{where}: {key} must be a positive whole number of epochs, got {value!r}")
        return value

    if "min_iter" in early_terminate:
        return Pruning(whole("min_iter"), eta)
    if "max_iter" in early_terminate and "s" in early_terminate:
        bands = [int(whole("max_iter") / eta ** k) for k in range(1, whole("s") + 1)]
        return Pruning(min(b for b in bands if b >= 1) if any(b >= 1 for b in bands) else 1, eta)
    raise SweepError(f"{where}: give min_iter (the first epoch at which runs are compared), or max_iter with s")


def _parameters(path: Path, parameters, method: str) -> tuple[dict, dict]:
    if not isinstance(parameters, dict) or not parameters:
        raise SweepError(f"{path}: parameters is empty; give at least one train option with values, value "
                         "or a distribution")
    known = train_options()
    space, constants = {}, {}
    for raw, spec in parameters.items():
        name = str(raw).replace("-", "_")
        if name not in known:
            raise SweepError(f"{path}: unknown parameter {raw!r}; the train options are: {', '.join(known)}")
        if not isinstance(spec, dict):
            raise SweepError(f"{path}: parameter {raw} must be a mapping (values: [...], value: ..., or a "
                             f"distribution), got {spec!r}")
        if "parameters" in spec:
            raise SweepError(f"{path}: parameter {raw}: nested parameters have no train option to go to")
        if method == "grid" and not ("values" in spec or "value" in spec):
            raise SweepError(f"{path}: parameter {raw}: a grid takes values or value (W&B's grid does not draw "
                             "from a distribution); use method: random or bayes")
        try:
            found = distribution(spec, option_kind(name))
        except (SweepError, KeyError, TypeError, ValueError) as exc:
            why = str(exc) if isinstance(exc, SweepError) else f"{type(exc).__name__}: {exc}"
            raise SweepError(f"{path}: parameter {raw}: {why}") from None
        if isinstance(found, Constant):
            constants[name] = found.value
        else:
            space[name] = found
    return space, constants


@dataclass(frozen=True)
class Constant:
    value: object


def distribution(spec: dict, kind: str = "float"):
    """The Optuna distribution of one W&B search constraint (or a Constant), for a train option whose values
    are of `kind`. W&B's default: categorical for values, constant for value, int_uniform for integer
    min/max, else uniform. Raises SweepError for a distribution Optuna has no counterpart of."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    name = spec.get("distribution")
    if name is None:
        name = ("categorical" if "values" in spec else "constant" if "value" in spec else
                "int_uniform" if all(_is_int(spec.get(k)) for k in ("min", "max")) else "uniform")
    if name not in DISTRIBUTIONS:
        raise SweepError(f"unknown distribution {name!r}; W&B's are {', '.join(DISTRIBUTIONS)}")
    if name in NO_COUNTERPART:
        raise SweepError(f"distribution {name} has no counterpart in Optuna (it draws from bounded ranges only); "
                         "use uniform, log_uniform_values or values")
    if name == "constant":
        return Constant(spec["value"])
    if name == "categorical":
        return _categorical(spec, CategoricalDistribution)
    if kind not in ("int", "float"):
        raise SweepError(f"the option takes {kind} values, not numbers from {name}: list them with values")
    low, high = spec["min"], spec["max"]
    if name in ("log_uniform", "inv_log_uniform"):  # bounds given as exponents of e
        low, high = (math.exp(low), math.exp(high)) if name == "log_uniform" else (math.exp(-high), math.exp(-low))
    if name in ("log_uniform_values", "inv_log_uniform_values", "q_log_uniform_values") and not 0 < low <= high:
        raise SweepError(f"{name} needs 0 < min <= max, got min {low}, max {high}")
    if name == "q_log_uniform_values":
        if spec.get("q", 1) != 1 or not (_is_int(low) and _is_int(high)):
            raise SweepError("q_log_uniform_values has a counterpart only with q 1 and whole min and max (Optuna's "
                             "integer log-uniform); use log_uniform_values for reals")
        return IntDistribution(int(low), int(high), log=True)
    if name == "q_log_uniform":
        raise SweepError("q_log_uniform has no counterpart in Optuna; use q_log_uniform_values with q 1 and whole "
                         "min and max, or log_uniform_values")
    integer = kind == "int" or name == "int_uniform"
    if integer and not (_is_int(low) and _is_int(high)):
        raise SweepError(f"the option takes whole numbers: give whole min and max (int_uniform), got {low}, {high}")
    if name == "q_uniform":
        return _stepped(low, high, spec.get("q", 1), integer, FloatDistribution, IntDistribution)
    if integer:
        return IntDistribution(int(low), int(high))
    return FloatDistribution(float(low), float(high), log=name != "uniform")


def _categorical(spec: dict, CategoricalDistribution):
    values = spec["values"]
    if not isinstance(values, list) or not values:
        raise SweepError(f"values must be a non-empty list, got {values!r}")
    weights = spec.get("probabilities")
    if weights is not None and (not isinstance(weights, list) or len(set(weights)) > 1):
        raise SweepError("unequal probabilities have no counterpart in Optuna, whose samplers draw every value "
                         "alike; drop them")
    return CategoricalDistribution(values)


def _stepped(low, high, q, integer: bool, FloatDistribution, IntDistribution):
    """W&B's q_uniform (round(X / q) * q, X uniform in [min, max]): Optuna's stepped distribution, whose values
    are min, min + q, ..., max: the same values when min and max are multiples of q."""
    steps = (high - low) / q
    if not (q > 0 and _whole(low / q) and _whole(steps)):
        raise SweepError(f"q_uniform maps to Optuna's stepped distribution only when min and max are multiples of q "
                         f"(min {low}, max {high}, q {q})")
    if integer:
        if not _is_int(q):
            raise SweepError(f"the option takes whole numbers: q must be whole, got {q}")
        return IntDistribution(int(low), int(high), step=int(q))
    return FloatDistribution(float(low), float(high), step=float(q))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _whole(x: float) -> bool:
    return math.isclose(x, round(x), abs_tol=1e-9)


# ---------------------------------------------------------------- one configuration's options


def option_argv(options: dict) -> list[str]:
    """Train flags for {option: value}: a bool is its flag or nothing; an int option takes 3.0 as 3."""
    argv = []
    for name, value in options.items():
        kind = option_kind(name)
        if kind == "bool":
            argv += [f"--{name.replace('_', '-')}"] if value else []
            continue
        if value is None:
            continue
        if kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def check_options(argv: list[str], where: str) -> Config:
    """The options parsed as tl_dist.train parses them; its error becomes a SweepError naming `where`."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse_args(argv)
    except SystemExit:
        last = [line for line in err.getvalue().splitlines() if "error:" in line][-1:]
        why = last[0].split("error:", 1)[1].strip() if last else err.getvalue().strip()
        why = re.sub(r" \(see python -m \S+ --help\)$", "", why)
        raise SweepError(f"{where}: {why}") from None


def short(value) -> str:
    """A value as it appears in a run folder's name."""
    text = f"{value:.4g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def folder_name(sweep: Sweep, index: int, params: dict) -> str:
    """`<NN>-<name>=<value>,...` (hydra's multirun style) over the parameters that vary, the configuration's
    index first so that names stay unique and sorted; it depends on nothing but the file and the index."""
    options = ",".join(f"{n}={short(params[n])}" for n in sweep.varying())[:80]
    return f"{index:02d}" + (f"-{options}" if options else "")
