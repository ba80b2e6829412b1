"""Config loading: defaults, example files, round trips, overrides and the error messages users read."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from kdray.config import (
    Config,
    ConfigError,
    DataConfig,
    LossTerm,
    ModelConfig,
    ObjectiveConfig,
    SearchDim,
    TeacherConfig,
    TrainConfig,
    TuneConfig,
    WorkflowConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    with_overrides,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "workflows" / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides)
    return str(info.value)


def non_default_config() -> Config:
    return Config(
        model=ModelConfig(name_or_path="org/student", revision="abc123", init="layer_pruned", keep_every=3),
        teacher=TeacherConfig(
            name_or_path="org/teacher",
            backend="vllm",
            top_k=None,
            temperature=2.0,
            replicas=2,
            num_gpus=0.5,
            resources={"teacher": 1.0},
            truncate=True,
        ),
        data=DataConfig(
            task="gsm8k", source="data/*.jsonl", format="jsonl", num_examples=10, eval_examples=None
        ),
        objective=ObjectiveConfig(
            method="gkd",
            terms=(
                LossTerm("xkd", 0.5, {"variant": "divergence", "lambda_td": 2.0, "gamma": 1, "flag": True}),
                LossTerm("reverse_kl", 1.5, {"temperature": 2.0, "note": None}),
            ),
            on_policy_fraction=0.25,
        ),
        train=TrainConfig(
            num_workers=2, use_gpu=True, lr=1e-5, grad_clip=None, precision="bf16", loss_chunk_size=7
        ),
        tune=TuneConfig(
            mode="max",
            scheduler="fifo",
            search_space={
                "train.lr": SearchDim("loguniform", low=1e-6, high=1e-3),
                "objective.terms.1.weight": SearchDim("choice", values=(0.0, 0.5, 1.0)),
                "objective.terms.0.params.lambda_td": SearchDim("grid", values=(0.1, 1.0)),
                "train.batch_size": SearchDim("randint", low=1, high=9),
            },
        ),
        workflow=WorkflowConfig(workdir="/tmp/x", steps=("data", "distill"), resume=False),
    )


# --- defaults and examples ---------------------------------------------------------------------------


def test_no_file_and_empty_file_give_the_defaults(tmp_path: Path) -> None:
    assert load_config(None) == Config()
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "# only a comment\n")) == Config()
    # a section with nothing under it (everything commented out) is the section's defaults
    assert load_config(write(tmp_path, "train:\n  # lr: 1e-4\n")) == Config()


def test_the_examples_exist() -> None:
    names = {path.name for path in EXAMPLES}
    assert {"quickstart.yaml", "multi30k.yaml", "smollm2_gsm8k.yaml", "cluster_gpu.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    assert cfg != Config()
    assert load_config(write(tmp_path, dump_config(cfg))) == cfg


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_objective_builds(path: Path) -> None:
    # term names and params are checked by the loss builder (torch), not by the config
    losses = pytest.importorskip("kdray.losses")
    objective = losses.build_objective(load_config(path).objective.terms)
    assert [t.name for t in objective.terms] == [t.name for t in load_config(path).objective.terms]


def test_example_values_that_workflows_rely_on() -> None:
    quick = load_config(ROOT / "workflows/configs/quickstart.yaml")
    assert quick.data.task == "arithmetic" and quick.data.source is None
    assert quick.teacher.name_or_path == "tiny" and quick.model.init == "layer_pruned"
    assert quick.objective.terms[0].params["divergence"] == "forward_kl"
    cluster = load_config(ROOT / "workflows/configs/cluster_gpu.yaml")
    assert cluster.teacher.resources == {"teacher": 1.0} and cluster.teacher.backend == "vllm"
    assert cluster.tune.search_space["train.lr"] == SearchDim("loguniform", low=5e-6, high=1e-4)
    smol = load_config(ROOT / "workflows/configs/smollm2_gsm8k.yaml")
    assert smol.model.init == "layer_pruned" and smol.model.keep_every == 2


# --- round trip and plain data -------------------------------------------------------------------------


def test_round_trip_of_a_config_full_of_non_defaults(tmp_path: Path) -> None:
    cfg = non_default_config()
    text = dump_config(cfg)
    assert load_config(write(tmp_path, text)) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_config_to_dict_is_plain_data() -> None:
    plain = config_to_dict(non_default_config())

    def check(value: object) -> None:
        assert isinstance(value, (dict, list, str, int, float, bool, type(None))), type(value)
        for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
            check(item)

    check(plain)
    assert plain["workflow"]["steps"] == ["data", "distill"]
    assert plain["tune"]["search_space"]["objective.terms.1.weight"]["values"] == [0.0, 0.5, 1.0]
    assert config_to_dict(TrainConfig(lr=0.5))["lr"] == 0.5  # one section works too


def test_strings_that_look_like_numbers_survive_a_round_trip(tmp_path: Path) -> None:
    cfg = Config(tracking=dataclasses.replace(Config().tracking, run_name="1e5", experiment="3.0"))
    assert load_config(write(tmp_path, dump_config(cfg))) == cfg


def test_exponent_floats_without_a_dot_are_numbers(tmp_path: Path) -> None:
    # plain PyYAML (YAML 1.1) reads `1e-4` as a string
    assert load_config(write(tmp_path, "train:\n  lr: 1e-4\n")).train.lr == 1e-4


# --- overrides ---------------------------------------------------------------------------------------


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  lr: 0.1\n  max_steps: 5\n")
    cfg = load_config(
        path,
        [
            "train.lr=1e-4",
            "teacher.top_k=null",
            "train.use_gpu=true",
            "objective.terms=[{name: forward_kl, weight: 0.5}, {name: ce}]",
            "workflow.steps=[data, distill]",
            "teacher.resources={teacher: 1}",
        ],
    )
    assert cfg.train.lr == 1e-4 and cfg.train.max_steps == 5  # the file's other values stay
    assert cfg.teacher.top_k is None and cfg.train.use_gpu is True
    assert cfg.objective.terms == (LossTerm("forward_kl", 0.5), LossTerm("ce"))
    assert cfg.workflow.steps == ("data", "distill")
    assert cfg.teacher.resources == {"teacher": 1.0}


def test_overrides_of_list_items_and_term_params() -> None:
    cfg = load_config(
        None,
        [
            "objective.terms=[{name: xkd}, {name: forward_kl}]",
            "objective.terms.1.weight=0.25",
            "objective.terms.0.params.lambda_td=2",
        ],
    )
    assert cfg.objective.terms == (LossTerm("xkd", params={"lambda_td": 2}), LossTerm("forward_kl", 0.25))


def test_overrides_apply_in_order_before_validation() -> None:
    # layer_pruned alone is invalid (it needs keep_every); the pair is valid
    cfg = load_config(None, ["model.init=layer_pruned", "model.keep_every=2"])
    assert (cfg.model.init, cfg.model.keep_every) == ("layer_pruned", 2)


def test_override_of_an_unknown_key_names_overrides_and_the_closest_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.lrr=1e-4"])
    message = str(info.value)
    assert "<overrides>" in message and "train.lrr=1e-4" in message and "`train.lr`" in message


def test_override_of_an_out_of_range_item_index() -> None:
    with pytest.raises(ConfigError, match=r"objective\.terms.*1 item.*`3`"):
        load_config(None, ["objective.terms.3.weight=1"])


@pytest.mark.parametrize("text", ["train.lr", "train=1", "lr=1", ".lr=1", "train.=1"])
def test_malformed_overrides_name_the_expected_form(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [text])
    assert repr(text) in str(info.value) and "section.key=value" in str(info.value)


def test_a_bad_override_value_is_blamed_on_the_override_not_the_file(tmp_path: Path) -> None:
    message = error_of(tmp_path, "train:\n  lr: 0.1\n", ("train.lr=-1",))
    assert message.startswith("<overrides> (train.lr=-1)") and "train.lr = -1.0" in message
    bad_file = error_of(tmp_path, "train:\n  lr: -1\n", ("train.max_steps=3",))
    assert bad_file.startswith(str(tmp_path / "run.yaml")) and "train.lr = -1.0" in bad_file


def test_with_overrides_sets_dotted_paths() -> None:
    cfg = with_overrides(
        Config(), {"train.lr": 0.01, "objective.terms.0.weight": 2, "workflow.steps": ("data",)}
    )
    assert cfg.train.lr == 0.01 and cfg.objective.terms[0].weight == 2.0 and cfg.workflow.steps == ("data",)
    with pytest.raises(ConfigError, match=r"did you mean `train\.lr`"):
        with_overrides(Config(), {"train.lrr": 0.01})


# --- error messages ----------------------------------------------------------------------------------


def test_unknown_key_in_a_file_names_path_file_and_suggestion(tmp_path: Path) -> None:
    message = error_of(tmp_path, "train:\n  lrr: 0.1\n")
    assert "train.lrr" in message and "run.yaml" in message and "did you mean `train.lr`" in message


def test_unknown_section_suggests_the_closest(tmp_path: Path) -> None:
    message = error_of(tmp_path, "trian:\n  lr: 0.1\n")
    assert "`trian`" in message and "did you mean `train`" in message


def test_unknown_key_without_a_close_match_lists_the_valid_keys(tmp_path: Path) -> None:
    message = error_of(tmp_path, "tracking:\n  zzzzzz: 1\n")
    assert "tracking.zzzzzz" in message and "enabled" in message and "registered_model" in message


def test_unknown_key_inside_a_list_item(tmp_path: Path) -> None:
    message = error_of(tmp_path, "objective:\n  terms:\n    - name: ce\n      wieght: 2\n")
    assert "objective.terms.0.wieght" in message and "objective.terms.0.weight" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train:\n  max_steps: ten\n", ["train.max_steps", "'ten'", "integer"]),
        ("train:\n  max_steps: 2.5\n", ["train.max_steps", "2.5", "integer"]),
        ("train:\n  max_steps: true\n", ["train.max_steps", "True", "integer"]),
        ("train:\n  lr: true\n", ["train.lr", "True", "number"]),
        ("train:\n  lr: .nan\n", ["train.lr", "nan", "finite number"]),
        ("train:\n  use_gpu: 3\n", ["train.use_gpu", "3", "boolean"]),
        ("teacher:\n  backend: tgi\n", ["teacher.backend", "'tgi'", "'hf'", "'vllm'"]),
        ("teacher:\n  top_k: many\n", ["teacher.top_k", "'many'", "integer or null"]),
        ("teacher:\n  resources: [teacher]\n", ["teacher.resources", "mapping"]),
        ("teacher:\n  resources: {teacher: x}\n", ["teacher.resources['teacher']", "'x'"]),
        ("workflow:\n  steps: [data, train]\n", ["workflow.steps.1", "'train'", "'distill'"]),
        ("objective:\n  terms: xkd\n", ["objective.terms", "'xkd'", "list"]),
        ("objective:\n  terms:\n    - weight: 1\n", ["objective.terms.0", "missing", "name"]),
        ("train: 5\n", ["train", "5", "mapping"]),
        ("- train\n", ["the config", "mapping"]),
    ],
)
def test_wrong_types_name_the_field_the_value_and_the_allowed(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    message = error_of(tmp_path, text)
    assert "run.yaml" in message
    for part in expected:
        assert part in message, (part, message)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train:\n  lr: -1\n", ["train.lr = -1.0", "> 0"]),
        ("train:\n  max_steps: 0\n", ["train.max_steps = 0", ">= 1"]),
        ("train:\n  grad_clip: 0\n", ["train.grad_clip = 0.0", "> 0"]),
        ("objective:\n  on_policy_fraction: 1.5\n", ["objective.on_policy_fraction = 1.5", "[0.0, 1.0]"]),
        ("teacher:\n  top_k: 0\n", ["teacher.top_k = 0", ">= 1"]),
        ("teacher:\n  resources: {teacher: 0}\n", ["teacher.resources['teacher'] = 0.0", "> 0"]),
        ("objective:\n  terms: []\n", ["objective.terms = ()", "non-empty"]),
        ("objective:\n  terms: [{name: ce, weight: -1}]\n", ["objective.terms.0.weight = -1.0", ">= 0"]),
        ("objective:\n  terms: [{name: ''}]\n", ["objective.terms.0.name = ''", "non-empty"]),
        (
            "objective:\n  terms: [{name: ce, params: {beta: [1]}}]\n",
            ["objective.terms.0.params.beta", "scalar"],
        ),
        ("model:\n  init: layer_pruned\n", ["model.keep_every = None", ">= 2"]),
        ("model:\n  init: layer_pruned\n  keep_every: 1\n", ["model.keep_every = 1", ">= 2"]),
        ("data:\n  format: jsonl\n", ["data.source = None", "'jsonl'"]),
        ("workflow:\n  steps: [data, data]\n", ["workflow.steps", "at most once"]),
        (
            "tune:\n  grace_period: 20\n  max_iterations: 10\n",
            ["tune.grace_period = 20", "<= tune.max_iterations (10)"],
        ),
    ],
)
def test_out_of_range_values_name_the_field_the_value_and_the_range(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    message = error_of(tmp_path, text)
    assert "run.yaml" in message
    for part in expected:
        assert part in message, (part, message)


@pytest.mark.parametrize(
    ("dim", "expected"),
    [
        ("{type: loguniform, low: 0, high: 1}", ["tune.search_space['train.lr'].low = 0.0", "> 0"]),
        ("{type: loguniform, low: -1, high: 1}", ["tune.search_space['train.lr'].low = -1.0", "> 0"]),
        (
            "{type: uniform, low: 1, high: 1}",
            ["tune.search_space['train.lr'].low/high = (1.0, 1.0)", "low < high"],
        ),
        ("{type: choice, values: []}", ["tune.search_space['train.lr'].values", "non-empty"]),
        ("{type: uniform, low: 0, high: 1, values: [1]}", ["tune.search_space['train.lr'].values", "null"]),
        (
            "{type: random, low: 0, high: 1}",
            ["tune.search_space['train.lr'].type", "'random'", "'loguniform'"],
        ),
        ("{type: randint, low: 0.5, high: 3}", ["randint", "integers"]),
    ],
)
def test_bad_search_dimensions(tmp_path: Path, dim: str, expected: list[str]) -> None:
    message = error_of(tmp_path, f"tune:\n  search_space:\n    train.lr: {dim}\n")
    for part in expected:
        assert part in message, (part, message)


def test_search_space_keys_must_be_config_paths(tmp_path: Path) -> None:
    dim = "{type: choice, values: [1, 2]}"
    message = error_of(tmp_path, f"tune:\n  search_space:\n    train.lrr: {dim}\n")
    assert "'train.lrr'" in message and "did you mean `train.lr`" in message
    message = error_of(tmp_path, f"tune:\n  search_space:\n    objective.terms.1.weight: {dim}\n")
    assert "'objective.terms.1.weight'" in message and "1 item" in message


def test_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, "train:\n  lr: 0.1\n  max_steps: [1, 2\n")
    assert "run.yaml" in message and "line" in message


def test_duplicate_keys_are_rejected(tmp_path: Path) -> None:
    message = error_of(tmp_path, "train:\n  lr: 0.1\ntrain:\n  max_steps: 3\n")
    assert "run.yaml" in message and "duplicate key 'train'" in message and "line 3" in message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError, match=r"train\.lr = 0"):
        TrainConfig(lr=0)


# --- the objects -------------------------------------------------------------------------------------


def test_configs_are_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = TrainConfig()  # type: ignore[misc]


def test_lists_from_python_become_tuples() -> None:
    # equality with a loaded config must not depend on list vs tuple
    assert ObjectiveConfig(terms=[LossTerm("ce")]) == ObjectiveConfig(terms=(LossTerm("ce"),))  # type: ignore[arg-type]
    assert WorkflowConfig(steps=["data"]).steps == ("data",)  # type: ignore[arg-type]


def test_ints_are_accepted_where_floats_are_expected(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "train:\n  lr: 1\nteacher:\n  num_gpus: 1\n"))
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float and type(cfg.teacher.num_gpus) is float


def test_every_field_has_a_docstring() -> None:
    # the house style: a one-line docstring under every field (the CLI and docs can show them)
    import ast

    import kdray.config as package

    nodes = [
        node
        for path in sorted(Path(package.__file__).parent.glob("*.py"))
        for node in ast.parse(path.read_text(encoding="utf-8")).body
    ]
    assert sum(isinstance(n, ast.ClassDef) for n in nodes) >= 12  # every section was found
    for node in nodes:
        if not (
            isinstance(node, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in node.decorator_list)
        ):
            continue
        body = node.body
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.AnnAssign) and not ast.unparse(stmt.annotation).startswith("ClassVar"):
                doc = body[i + 1] if i + 1 < len(body) else None
                assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant), (
                    node.name,
                    stmt.target,
                )


def test_importing_the_config_stays_light() -> None:
    code = (
        "import sys, kdray.config; "
        "heavy = [m for m in ('torch', 'ray', 'transformers', 'mlflow', 'numpy') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr
