"""Specification of diloco.config: defaults, loading, overrides, validation and fingerprints."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest

from diloco.config import (
    FINGERPRINT_IGNORE,
    Config,
    config_fingerprint,
    config_from_dict,
    config_reference,
    config_to_dict,
    dump_config,
    load_config,
)
from diloco.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def nested(settings: dict[str, object]) -> dict[str, dict[str, object]]:
    """``{"outer.lr": 1}`` -> ``{"outer": {"lr": 1}}``."""
    out: dict[str, dict[str, object]] = {}
    for dotted, value in settings.items():
        section, key = dotted.split(".")
        out.setdefault(section, {})[key] = value
    return out


def error_for(settings: dict[str, object]) -> str:
    """The one-line ConfigError message that ``settings`` (dotted keys) on the defaults raise."""
    with pytest.raises(ConfigError) as info:
        config_from_dict(nested(settings))
    message = str(info.value)
    assert "\n" not in message
    return message


def write(tmp_path: Path, text: str) -> Path:
    """A config file holding ``text``."""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


# --- defaults and shipped configs ----------------------------------------------------------------


def test_defaults_are_the_tiny_cpu_snoo_run_and_validate():
    cfg = load_config()
    assert cfg == Config() == config_from_dict({})
    outer = cfg.outer
    assert (outer.method, outer.sync_every, outer.lr, outer.momentum) == ("nesterov", 16, 0.7, 0.5)
    assert (cfg.topology.groups, cfg.topology.shards, cfg.run.device) == (1, 1, "auto")


def test_every_field_has_a_doc_and_appears_in_the_reference():
    reference = config_reference()
    for section in dataclasses.fields(Config):
        assert f"### `{section.name}`" in reference
        for f in dataclasses.fields(section.default_factory):
            assert f.metadata["doc"], f"{section.name}.{f.name} has no doc"
            assert f"| `{f.name}` |" in reference


def test_config_module_does_not_import_torch():
    imported = set()
    for path in sorted((ROOT / "diloco" / "config").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
    assert "torch" not in imported


def test_configs_directory_ships_the_documented_files():
    names = {path.name for path in SHIPPED}
    assert names >= {
        "tiny_snoo.yaml",
        "tiny_adamw.yaml",
        "tiny_ema_nesterov_k1.yaml",
        "tiny_ema_nesterov_k16.yaml",
        "tiny_diloco_2x2_cpu.yaml",
        "gpt124m_gpu.yaml",
        "gpt124m_8gpu_diloco.yaml",
    }


@pytest.mark.parametrize("path", SHIPPED, ids=[path.name for path in SHIPPED])
def test_shipped_config_loads_and_its_header_says_how_to_run_it(path):
    load_config(str(path))
    text = path.read_text()
    assert text.startswith("# ")
    assert f"--config configs/{path.name}" in text


def test_tiny_snoo_is_the_defaults_written_out():
    cfg = load_config(str(ROOT / "configs" / "tiny_snoo.yaml"))
    assert cfg.run.out_dir == "runs/tiny_snoo"
    assert dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir="runs/default")) == (
        Config()
    )


def test_tiny_adamw_differs_from_tiny_snoo_only_by_having_no_outer_step():
    snoo = load_config(str(ROOT / "configs" / "tiny_snoo.yaml"))
    adamw = load_config(str(ROOT / "configs" / "tiny_adamw.yaml"))
    assert adamw.outer.method == "none"
    outer = dataclasses.replace(adamw.outer, method="nesterov")
    assert dataclasses.replace(adamw, run=snoo.run, outer=outer) == snoo


def test_ema_nesterov_k1_is_the_paper_form():
    outer = load_config(str(ROOT / "configs" / "tiny_ema_nesterov_k1.yaml")).outer
    assert (outer.method, outer.sync_every, outer.lr) == ("ema_nesterov", 1, 1.0)
    assert (outer.ema_beta, outer.ema_gamma, outer.ema_init) == (0.7, 0.99, "first_increment")
    assert (outer.ema_warmup, outer.ema_rest) == (0.3, 0.1)


def test_tiny_diloco_2x2_is_four_cpu_processes_over_gloo():
    cfg = load_config(str(ROOT / "configs" / "tiny_diloco_2x2_cpu.yaml"))
    assert (cfg.topology.groups, cfg.topology.shards, cfg.topology.backend) == (2, 2, "gloo")
    assert (cfg.run.device, cfg.outer.method, cfg.outer.sync_every) == ("cpu", "nesterov", 16)
    assert (cfg.outer.lr, cfg.outer.momentum) == (0.7, 0.9)


def test_gpt124m_8gpu_is_eight_groups_over_nccl():
    topology = load_config(str(ROOT / "configs" / "gpt124m_8gpu_diloco.yaml")).topology
    assert (topology.groups * topology.shards, topology.backend) == (8, "nccl")


def test_gpt124m_configs_describe_gpt2_small_on_fineweb():
    for name in ("gpt124m_gpu.yaml", "gpt124m_8gpu_diloco.yaml"):
        cfg = load_config(str(ROOT / "configs" / name))
        model = cfg.model
        assert (model.n_layer, model.n_head, model.n_embd, model.block_size) == (12, 12, 768, 1024)
        assert model.vocab_size == 50304
        assert cfg.data.source == "bin:data/fineweb10B/fineweb_train_*.bin"
        assert (cfg.inner.lr, cfg.inner.warmup_steps, cfg.train.steps) == (6e-4, 700, 5000)
        assert (cfg.outer.sync_every, cfg.outer.lr, cfg.outer.momentum) == (32, 0.7, 0.9)
        assert (cfg.run.device, cfg.topology.mixed_precision) == ("cuda", "bf16")


# --- files ---------------------------------------------------------------------------------------


def test_file_values_are_deep_merged_over_the_defaults(tmp_path):
    cfg = load_config(str(write(tmp_path, "outer:\n  lr: 0.9\n")))
    assert cfg.outer.lr == 0.9
    assert cfg.outer.momentum == Config().outer.momentum
    assert cfg.model == Config().model


def test_empty_file_and_empty_section_mean_defaults(tmp_path):
    assert load_config(str(write(tmp_path, "# nothing\n"))) == Config()
    assert load_config(str(write(tmp_path, "outer:\n"))) == Config()


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_yaml_syntax_error_gives_file_and_line(tmp_path):
    path = write(tmp_path, "outer:\n  lr: 0.7\n  momentum: [0.5\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:4:1: invalid YAML: "):
        load_config(str(path))


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"must be a mapping of sections .*got \['a'\] \(list\)"):
        load_config(str(write(tmp_path, "- a\n")))


def test_section_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"section 'outer' must be a mapping .*got 5 \(int\)"):
        load_config(str(write(tmp_path, "outer: 5\n")))


# --- unknown keys --------------------------------------------------------------------------------


def test_typo_in_a_key_suggests_the_closest_key():
    assert error_for({"outer.sync_evry": 8}) == (
        "unknown config key 'outer.sync_evry'; did you mean 'outer.sync_every'?"
    )


def test_typo_in_a_section_suggests_the_closest_section():
    with pytest.raises(
        ConfigError, match=r"^unknown config section 'outr'; did you mean 'outer'\?$"
    ):
        config_from_dict({"outr": {"lr": 1.0}})


def test_key_in_the_wrong_section_suggests_the_section_that_has_it():
    assert error_for({"outer.batch_size": 8}) == (
        "unknown config key 'outer.batch_size'; did you mean 'data.batch_size'?"
    )


def test_unknown_section_without_a_close_match_lists_the_sections():
    with pytest.raises(
        ConfigError, match=r"^unknown config section 'zzz'; valid: run, model, data"
    ):
        config_from_dict({"zzz": {}})


def test_unknown_key_without_a_close_match_lists_the_section_keys():
    message = error_for({"topology.zzzz": 1})
    assert message.startswith("unknown config key 'topology.zzzz'; valid keys in 'topology': ")
    assert "groups, shards, backend" in message


# --- --set overrides -----------------------------------------------------------------------------


def test_overrides_parse_values_by_the_keys_type():
    cfg = load_config(
        overrides=[
            "outer.sync_every=32",
            "inner.lr=3e-4",
            "run.progress=false",
            "inner.betas=[0.8, 0.99]",
            "outer.method=ema_nesterov",
            "data.source=text:corpus.txt",
        ]
    )
    assert cfg.outer.sync_every == 32
    assert cfg.inner.lr == 3e-4
    assert cfg.run.progress is False
    assert cfg.inner.betas == [0.8, 0.99]
    assert cfg.outer.method == "ema_nesterov"
    assert cfg.data.source == "text:corpus.txt"


def test_overrides_win_over_the_file_and_apply_in_order(tmp_path):
    path = write(tmp_path, "outer:\n  lr: 0.9\n  momentum: 0.8\n")
    cfg = load_config(str(path), ["outer.lr=0.5", "outer.lr=0.6"])
    assert (cfg.outer.lr, cfg.outer.momentum) == (0.6, 0.8)


@pytest.mark.parametrize(
    "override",
    ["outer.sync_every", "sync_every=8", "=8", "outer.=8", "outer.sync.every=8"],
    ids=["no-equals", "no-section", "no-key", "empty-key", "too-deep"],
)
def test_malformed_override_shows_the_expected_form(override):
    with pytest.raises(ConfigError, match=r"is not of the form --set section\.key=value"):
        load_config(overrides=[override])


def test_override_without_section_suggests_the_full_key():
    with pytest.raises(ConfigError, match=r"did you mean --set outer\.sync_every=8\?$"):
        load_config(overrides=["sync_every=8"])


@pytest.mark.parametrize(
    "text",
    ["text:data/a #b.txt", "text:C: drive/x.txt", "text:'quoted'.txt", "text:[x].txt", "text: x "],
    ids=["hash", "colon-space", "quotes", "brackets", "spaces"],
)
def test_string_override_takes_the_text_exactly_as_typed(text):
    assert load_config(overrides=[f"data.source={text}"]).data.source == text


@pytest.mark.parametrize("text", ["yes", "on", "1", "y"])
def test_boolean_override_is_true_or_false_only(text):
    with pytest.raises(ConfigError, match=rf"^run.progress must be true or false, got '{text}'"):
        load_config(overrides=[f"run.progress={text}"])


def test_boolean_override_ignores_case_and_surrounding_spaces():
    assert load_config(overrides=["run.progress= False "]).run.progress is False
    assert load_config(overrides=["run.tensorboard=TRUE"]).run.tensorboard is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.steps=1e3", "train.steps must be an integer, got '1e3' (str)"),
        ("train.steps=10.0", "train.steps must be an integer, got '10.0' (str)"),
        ("train.steps=0x10", "train.steps must be an integer, got '0x10' (str)"),
        ("inner.lr=.inf", "inner.lr must be a finite number, got '.inf' (str)"),
        ("inner.lr=1e-3 # fast", "inner.lr must be a finite number, got '1e-3 # fast' (str)"),
    ],
    ids=["int-exponent", "int-with-dot", "int-hex", "float-yaml-inf", "float-with-comment"],
)
def test_number_override_is_parsed_strictly(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=[override])


def test_integer_and_number_overrides_accept_signs_and_exponents():
    cfg = load_config(overrides=["train.steps=+64", "inner.lr=3E-4", "outer.lr=1"])
    assert (cfg.train.steps, cfg.inner.lr, cfg.outer.lr) == (64, 3e-4, 1.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("run:\n  out_dir: 2024\n", "run.out_dir must be a string, got 2024 (int); YAML reads"),
        ("outer:\n  offload: no\n", "got False; YAML reads an unquoted yes/no/on/off"),
        ("data:\n  source:\n", "data.source must be a string, got None (NoneType); YAML reads an"),
    ],
    ids=["number", "boolean", "empty"],
)
def test_yaml_value_of_another_type_for_a_text_key_says_to_quote_it(tmp_path, text, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_config(str(write(tmp_path, text)))
    assert str(info.value).endswith("put the value in quotes")


def test_override_with_invalid_yaml_value_names_the_override():
    with pytest.raises(ConfigError, match=r"^--set 'inner\.betas=\[0\.9,': invalid YAML value: "):
        load_config(overrides=["inner.betas=[0.9,"])


def test_override_of_an_unknown_key_suggests_the_closest_key():
    with pytest.raises(ConfigError, match=r"did you mean 'outer\.sync_every'\?"):
        load_config(overrides=["outer.sync_evry=8"])


# --- types ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("outer.sync_every", "abc", "outer.sync_every must be an integer, got 'abc' (str)"),
        ("train.steps", True, "train.steps must be an integer, got True (bool)"),
        ("train.steps", 10.0, "train.steps must be an integer, got 10.0 (float)"),
        ("outer.lr", "fast", "outer.lr must be a finite number, got 'fast' (str)"),
        ("outer.lr", True, "outer.lr must be a finite number, got True (bool)"),
        ("outer.lr", float("inf"), "outer.lr must be a finite number, got inf (float)"),
        ("outer.lr", float("nan"), "outer.lr must be a finite number, got nan (float)"),
        ("run.progress", 1, "run.progress must be true or false, got 1 (int)"),
        (
            "run.out_dir",
            7,
            "run.out_dir must be a string, got 7 (int); YAML reads an unquoted number as a "
            "number: put the value in quotes",
        ),
        ("inner.betas", 0.9, "inner.betas must be a list of numbers, got 0.9 (float)"),
        ("inner.betas", [0.9, "x"], "inner.betas must be a list of numbers, got [0.9, 'x'] (list)"),
    ],
    ids=[
        "int-from-str",
        "bool-is-not-int",
        "float-is-not-int",
        "float-from-word",
        "bool-is-not-float",
        "float-inf",
        "float-nan",
        "bool-from-int",
        "str-from-int",
        "list-from-scalar",
        "list-of-non-numbers",
    ],
)
def test_wrong_type_names_key_value_and_expected_type(key, value, message):
    assert error_for({key: value}) == message


def test_int_is_accepted_for_a_float_field_and_stored_as_float():
    cfg = config_from_dict({"outer": {"lr": 1}, "inner": {"betas": [0, 0]}})
    assert cfg.outer.lr == 1.0 and isinstance(cfg.outer.lr, float)
    assert cfg.inner.betas == [0.0, 0.0] and all(isinstance(b, float) for b in cfg.inner.betas)


def test_yaml_1_1_exponent_strings_are_read_as_floats(tmp_path):
    # PyYAML reads 3e-4 (no dot) as a string; a float field accepts it as the number.
    cfg = load_config(str(write(tmp_path, "inner:\n  lr: 3e-4\n  eps: 1e-6\n")))
    assert (cfg.inner.lr, cfg.inner.eps) == (3e-4, 1e-6)


ENUMS = {
    "run.device": "auto, cpu, cuda",
    "run.wandb": "off, offline, online",
    "inner.optimizer": "adamw, sgd, muon",
    "inner.schedule": "constant, cosine, wsd",
    "outer.method": "nesterov, sgd, ema_nesterov, none",
    "outer.ema_init": "zero, first_increment",
    "outer.offload": "none, cpu",
    "outer.compress": "none, bf16, int8",
    "topology.backend": "auto, gloo, nccl",
    "topology.mixed_precision": "auto, fp32, bf16, fp64",
}


@pytest.mark.parametrize(("key", "allowed"), ENUMS.items(), ids=list(ENUMS))
def test_enum_lists_the_allowed_values(key, allowed):
    assert error_for({key: "adam"}) == f"{key} must be one of {allowed}; got 'adam'"


def test_bare_off_means_off_for_a_key_that_has_an_off_choice(tmp_path):
    assert load_config(str(write(tmp_path, "run:\n  wandb: off\n"))).run.wandb == "off"


def test_wandb_is_off_by_default_and_takes_offline_or_online():
    assert Config().run.wandb == "off"
    assert load_config(overrides=["run.wandb=offline"]).run.wandb == "offline"


def test_enum_rejects_a_yaml_bool_read_from_off(tmp_path):
    with pytest.raises(ConfigError, match="outer.offload must be one of none, cpu; got False"):
        load_config(str(write(tmp_path, "outer:\n  offload: off\n")))


# --- ranges: one rule per key --------------------------------------------------------------------

# (key, rejected value, accepted edge value, allowed range as the message states it)
RANGES = [
    ("run.seed", -1, 0, ">= 0"),
    ("model.vocab_size", 1, 2, ">= 2"),
    ("model.block_size", 0, 1, ">= 1"),
    ("model.n_layer", 0, 1, ">= 1"),
    ("model.n_head", 0, 1, ">= 1"),
    ("model.n_embd", 0, 4, ">= 1"),
    ("model.dropout", 1.0, 0.0, "in [0, 1)"),
    ("data.batch_size", 0, 1, ">= 1"),
    ("inner.lr", 0.0, 1e-9, "> 0"),
    ("inner.weight_decay", -0.1, 0.0, ">= 0"),
    ("inner.eps", 0.0, 1e-12, "> 0"),
    ("inner.momentum", 1.0, 0.0, "in [0, 1)"),
    ("inner.muon_lr", -0.02, 1e-9, "> 0"),
    ("inner.warmup_steps", -1, 0, ">= 0"),
    ("inner.min_lr_ratio", 1.5, 1.0, "in [0, 1]"),
    ("inner.decay_frac", -0.1, 0.0, "in [0, 1]"),
    ("inner.grad_clip", -1.0, 0.0, ">= 0 (0 disables clipping)"),
    ("outer.sync_every", 0, 1, ">= 1"),
    ("outer.lr", 0.0, 1e-9, "> 0"),
    ("outer.momentum", 1.0, 0.0, "in [0, 1)"),
    ("outer.ema_beta", 1.0, 0.0, "in [0, 1)"),
    ("outer.ema_gamma", -0.5, 0.0, "in [0, 1)"),
    ("outer.ema_warmup", 1.0, 0.0, "in [0, 1)"),
    ("outer.ema_rest", -0.1, 0.0, "in [0, 1)"),
    ("outer.fragments", 0, 1, ">= 1"),
    ("outer.sync_delay", -1, 0, ">= 0"),
    ("outer.mix_alpha", 1.5, 1.0, "in [0, 1]"),
    ("train.steps", 0, 51, ">= 1"),
    ("train.eval_every", -1, 0, ">= 0 (0 = only the final evaluation)"),
    ("train.eval_batches", 0, 1, ">= 1"),
    ("train.log_every", 0, 1, ">= 1"),
    ("train.checkpoint_every", -1, 0, ">= 0 (0 = no checkpoints)"),
    ("train.keep_last", 0, 1, ">= 1"),
    ("train.max_bad_rounds", 0, 1, ">= 1"),
    ("train.check_every", 0, 1, ">= 1"),
    ("topology.groups", 0, 1, ">= 1"),
    ("topology.shards", 0, 1, ">= 1"),
    ("topology.timeout_s", 0, 1, ">= 1"),
]
RANGE_IDS = [key for key, *_ in RANGES]


@pytest.mark.parametrize(("key", "bad", "edge", "allowed"), RANGES, ids=RANGE_IDS)
def test_out_of_range_value_names_key_value_and_range(key, bad, edge, allowed):
    assert error_for({key: bad}) == f"{key} must be {allowed}, got {bad!r}"


@pytest.mark.parametrize(("key", "bad", "edge", "allowed"), RANGES, ids=RANGE_IDS)
def test_edge_of_the_range_is_accepted(key, bad, edge, allowed):
    config_from_dict(nested({key: edge}))


# (key, rejected value, accepted largest value): sizes that could never be allocated
SIZE_LIMITS = [
    ("run.seed", 2**32, 2**32 - 1),
    ("model.vocab_size", 2**20 + 1, 2**20),
    ("model.block_size", 2**20 + 1, 2**20),
    ("model.n_layer", 1025, 1024),
    ("model.n_embd", 65537, 65536),
    ("data.batch_size", 2**20 + 1, 2**20),
    ("outer.compress_block", 10**11, 65536),
    ("train.eval_batches", 100_001, 100_000),
    ("topology.groups", 65537, 65536),
    ("topology.shards", 65537, 65536),
    ("topology.timeout_s", 10**20, 7 * 86400),
]


@pytest.mark.parametrize(("key", "bad", "edge"), SIZE_LIMITS, ids=[k for k, *_ in SIZE_LIMITS])
def test_size_like_key_has_an_upper_limit(key, bad, edge):
    assert error_for({key: bad}).startswith(f"{key} must be <= {edge}")


# --- cross-field and format rules ----------------------------------------------------------------

RULES = {
    "out_dir-non-empty": (
        {"run.out_dir": " "},
        "run.out_dir must be a non-empty path, got ' '",
    ),
    "n_embd-divisible-by-n_head": (
        {"model.n_embd": 100, "model.n_head": 3},
        "model.n_embd (100) must be divisible by model.n_head (3)",
    ),
    "source-format": (
        {"data.source": "corpus.txt"},
        "data.source must be embedded, text:<path>, bin:<glob> or hf:<path>, got 'corpus.txt'",
    ),
    "model-source-format": (
        {"model.source": "llama"},
        "model.source must be gpt or hf:<path of a local model directory>, got 'llama'",
    ),
    "hf-data-needs-a-tokenizer": (
        {"data.source": "hf:data/"},
        "data.source='hf:data/' needs a tokenizer for its text; set data.tokenizer=PATH",
    ),
    "tokenizer-with-embedded-bytes": (
        {"data.tokenizer": "tok/"},
        "data.tokenizer='tok/' with data.source=embedded (byte tokens)",
    ),
    "source-needs-a-path": (
        {"data.source": "text:"},
        "data.source must be embedded, text:<path>, bin:<glob> or hf:<path>, got 'text:'",
    ),
    "batch-divisible-by-shards": (
        {"data.batch_size": 15, "topology.shards": 2},
        "data.batch_size (15) must be divisible by topology.shards (2): the group batch is split "
        "across the shards; e.g. data.batch_size=16",
    ),
    "muon-needs-whole-matrices": (
        {"inner.optimizer": "muon", "topology.shards": 2},
        "inner.optimizer=muon with topology.shards=2: Muon orthogonalises whole weight matrices",
    ),
    "betas-length-2": (
        {"inner.betas": [0.9]},
        "inner.betas must be two numbers [beta1, beta2], got [0.9]",
    ),
    "betas-in-unit-interval": (
        {"inner.betas": [0.9, 1.0]},
        "inner.betas must each be in [0, 1), got [0.9, 1.0]",
    ),
    "warmup-shorter-than-run": (
        {"inner.warmup_steps": 800},
        "inner.warmup_steps (800) must be < train.steps (800)",
    ),
    "ema-warmup-plus-rest-below-1": (
        {"outer.ema_warmup": 0.6, "outer.ema_rest": 0.4},
        "outer.ema_warmup + outer.ema_rest must be < 1 so that some steps use beta > 0, "
        "got 0.6 + 0.4",
    ),
    "fragments-at-most-n_layer": (
        {"outer.fragments": 5},
        "outer.fragments (5) must be <= model.n_layer (4): each fragment holds at least one layer",
    ),
    "sync_delay-below-sync_every": (
        {"outer.sync_delay": 16},
        "outer.sync_delay (16) must be < outer.sync_every (16)",
    ),
    "method-none-needs-one-group": (
        {"outer.method": "none", "topology.groups": 2},
        "outer.method=none with topology.groups=2: without an outer step the groups never "
        "synchronise; use outer.method=nesterov or sgd, or topology.groups=1",
    ),
}


@pytest.mark.parametrize(("settings", "message"), RULES.values(), ids=list(RULES))
def test_cross_field_rule_names_both_values_and_the_fix(settings, message):
    assert error_for(settings).startswith(message)


@pytest.mark.parametrize(
    ("key", "value"),
    [("compress", "int8"), ("fragments", 2), ("sync_delay", 1), ("mix_alpha", 0.5)],
)
def test_streaming_options_need_an_outer_step(key, value):
    message = error_for({"outer.method": "none", f"outer.{key}": value})
    assert message.startswith(f"outer.{key}={value!r} needs an outer step")
    assert "use outer.method=nesterov, sgd or ema_nesterov" in message


@pytest.mark.parametrize("method", ["nesterov", "sgd", "ema_nesterov"])
def test_streaming_options_are_accepted_with_an_outer_step(method):
    config_from_dict(
        nested(
            {
                "outer.method": method,
                "outer.compress": "int8",
                "outer.fragments": 2,
                "outer.sync_delay": 1,
                "outer.mix_alpha": 0.5,
            }
        )
    )


@pytest.mark.parametrize("source", ["embedded", "text:data/tiny.txt", "bin:data/*.bin"])
def test_valid_data_sources_are_not_checked_for_existence(source):
    assert config_from_dict({"data": {"source": source}}).data.source == source


# --- serialisation and fingerprint ---------------------------------------------------------------

CUSTOM = {
    "run.out_dir": "runs/x",
    "inner.lr": 3e-4,
    "inner.eps": 1e-10,
    "inner.betas": [0.8, 0.99],
    "outer.method": "ema_nesterov",
    "topology.shards": 2,
    "run.tensorboard": True,
}


def test_config_to_dict_is_json_serialisable_and_round_trips():
    cfg = config_from_dict(nested(CUSTOM))
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert config_from_dict(data) == cfg


def test_dump_then_load_gives_an_equal_config(tmp_path):
    cfg = config_from_dict(nested(CUSTOM))
    path = tmp_path / "run" / "config.yaml"
    dump_config(cfg, path)
    assert load_config(str(path)) == cfg


def test_fingerprint_is_a_stable_hex_digest():
    fingerprint = config_fingerprint(Config())
    assert fingerprint == config_fingerprint(load_config())
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0


#: An elastic group's settings (the elastic keys only mean something with them).
ELASTIC = {
    "topology.elastic": True,
    "topology.groups": 2,
    "topology.group_id": 0,
    "topology.coordinator": "127.0.0.1:29510",
}


@pytest.mark.parametrize("key", FINGERPRINT_IGNORE)
def test_fingerprint_ignores_settings_that_do_not_change_the_maths(key):
    """Also: every group of an elastic job (and every restart of one, at any coordinator
    address) has the same fingerprint."""
    value = {
        "run.out_dir": "elsewhere",
        "run.progress": False,
        "run.tensorboard": True,
        "run.wandb": "offline",
        "topology.group_id": 1,
        "topology.coordinator": "10.0.0.2:29600",
    }.get(key, 99)
    base = ELASTIC if key in ELASTIC or key.endswith("timeout_s") else {}
    changed = config_from_dict(nested({**base, key: value}))
    assert config_fingerprint(changed) == config_fingerprint(config_from_dict(nested(base)))


def test_fingerprint_ignores_train_steps_so_a_run_can_be_extended():
    longer = config_from_dict({"train": {"steps": 1600}})
    assert config_fingerprint(longer) == config_fingerprint(Config())


@pytest.mark.parametrize(
    "settings",
    [{"outer.lr": 0.8}, {"inner.betas": [0.9, 0.99]}, {"topology.groups": 2}, {"run.seed": 1}],
    ids=["outer.lr", "inner.betas", "topology.groups", "run.seed"],
)
def test_fingerprint_changes_with_settings_that_change_the_maths(settings):
    assert config_fingerprint(config_from_dict(nested(settings))) != config_fingerprint(Config())


# --- streaming fragments (diloco/algorithm/streaming.py) -----------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"outer.sync_every": 10, "outer.fragments": 4},
            "outer.sync_every (10) must be divisible by outer.fragments (4): fragment i syncs at "
            "offset (i+1)*sync_every/fragments; e.g. outer.sync_every=12",
        ),
        (
            {"outer.sync_every": 16, "outer.fragments": 4, "outer.sync_delay": 4},
            "outer.sync_delay (4) must be < outer.sync_every / outer.fragments (4): a fragment's "
            "reduction must land before the next fragment's starts",
        ),
    ],
    ids=["sync_every-divisible-by-fragments", "sync_delay-below-sync_every-over-fragments"],
)
def test_streaming_schedule_rules_name_both_values(settings, message):
    assert error_for(settings).startswith(message)


def test_streaming_schedule_at_its_limits_is_accepted():
    cfg = config_from_dict(
        nested({"outer.sync_every": 16, "outer.fragments": 4, "outer.sync_delay": 3})
    )
    assert (cfg.outer.fragments, cfg.outer.sync_delay) == (4, 3)


def test_int8_compression_block_defaults_to_256_and_must_be_at_least_8():
    assert Config().outer.compress_block == 256
    assert error_for({"outer.compress_block": 4}) == "outer.compress_block must be >= 8, got 4"
    cfg = config_from_dict(nested({"outer.compress": "int8", "outer.compress_block": 64}))
    assert (cfg.outer.compress, cfg.outer.compress_block) == ("int8", 64)


# --- inner.engine: DeepSpeed ZeRO ----------------------------------------------------------------


def test_inner_engine_defaults_to_fsdp2_with_zero_stage_2_and_no_passthrough():
    inner = Config().inner
    assert (inner.engine, inner.zero_stage, inner.deepspeed) == ("fsdp2", 2, {})


def test_deepspeed_passthrough_is_a_plain_copy_that_round_trips(tmp_path):
    passthrough = {"zero_optimization": {"overlap_comm": False}, "wall_clock_breakdown": True}
    settings = {"inner.engine": "deepspeed", "inner.zero_stage": 3, "inner.deepspeed": passthrough}
    cfg = config_from_dict(nested(settings))
    assert cfg.inner.deepspeed == passthrough and cfg.inner.deepspeed is not passthrough
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(str(tmp_path / "resolved.yaml")) == cfg
    assert config_fingerprint(cfg) != config_fingerprint(Config())


def test_deepspeed_passthrough_from_the_command_line():
    overrides = [
        "inner.engine=deepspeed",
        "inner.deepspeed={zero_optimization: {overlap_comm: no}}",
    ]
    assert load_config(None, overrides).inner.deepspeed == {
        "zero_optimization": {"overlap_comm": False}
    }


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"inner.zero_stage": 0}, "inner.zero_stage must be one of 1, 2, 3, got 0"),
        ({"inner.engine": "zero"}, "inner.engine must be one of fsdp2, deepspeed; got 'zero'"),
        ({"inner.deepspeed": [1]}, "inner.deepspeed must be a mapping of JSON values"),
        (
            {"inner.deepspeed": {"bf16": {"enabled": True}}},
            "inner.deepspeed is set but inner.engine is fsdp2",
        ),
        (
            {"inner.engine": "deepspeed", "inner.optimizer": "muon"},
            "inner.optimizer=muon is not supported with inner.engine=deepspeed",
        ),
        (
            {"inner.engine": "deepspeed", "outer.fragments": 2},
            "outer.fragments=2 (streaming) is not supported with inner.engine=deepspeed",
        ),
        (
            {"inner.engine": "deepspeed", "inner.deepspeed": {"zero_optimization": 2}},
            "inner.deepspeed.zero_optimization must be a mapping",
        ),
        (
            {"inner.engine": "deepspeed", "topology.mixed_precision": "fp64"},
            "topology.mixed_precision=fp64 with inner.engine=deepspeed",
        ),
    ],
    ids=[
        "stage",
        "engine",
        "not-a-mapping",
        "fsdp2-with-passthrough",
        "muon",
        "streaming",
        "zero_optimization-not-a-mapping",
        "fp64",
    ],
)
def test_deepspeed_settings_are_validated(settings, message):
    assert error_for(settings).startswith(message)


@pytest.mark.parametrize(
    "passthrough, key, source",
    [
        ({"train_batch_size": 32}, "train_batch_size", "data.batch_size"),
        ({"optimizer": {"type": "Adam"}}, "optimizer", "inner.optimizer"),
        ({"gradient_clipping": 0.5}, "gradient_clipping", "inner.grad_clip"),
        ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage", "inner.zero_stage"),
    ],
)
def test_deepspeed_keys_diloco_sets_itself_are_refused_by_name(passthrough, key, source):
    message = error_for({"inner.engine": "deepspeed", "inner.deepspeed": passthrough})
    assert message.startswith(f"inner.deepspeed.{key} is set by diloco (from {source}")


def test_tiny_deepspeed_2x2_is_the_tiny_diloco_2x2_run_with_zero2():
    deepspeed = load_config(str(ROOT / "configs" / "tiny_deepspeed_2x2_cpu.yaml"))
    fsdp2 = load_config(str(ROOT / "configs" / "tiny_diloco_2x2_cpu.yaml"))
    assert (deepspeed.inner.engine, deepspeed.inner.zero_stage) == ("deepspeed", 2)
    inner = dataclasses.replace(deepspeed.inner, engine="fsdp2")
    assert dataclasses.replace(deepspeed, run=fsdp2.run, inner=inner) == fsdp2
