"""The run configuration: its choices match the code that implements them, it imports no
inference code, the data-dependent defaults are fixed by formula, and a config.json that is not
what ``fit`` writes is refused field by field (one UserError line naming the file and field)."""

import dataclasses
import json
import subprocess
import sys

import pytest

from ppl_vae.core.errors import UserError
from ppl_vae.fit import build_parser, config_from_args
from ppl_vae.training.config import DEFAULT_MIN_EPOCHS, DEFAULT_MIN_STEPS, FitConfig, default_epochs
from ppl_vae.training.config_checks import ELBO_CHOICES, field_types


def test_elbo_choices_are_the_implemented_objectives():
    from ppl_vae.inference.objectives import OBJECTIVES

    assert ELBO_CHOICES == OBJECTIVES


def test_config_imports_no_inference_or_training_code():
    """``training.config`` names the choices of the programs and data but pulls in no inference,
    report or other training code (checked in a fresh interpreter, whose module table is clean)."""
    code = "import sys, ppl_vae.training.config; print(' '.join(m for m in sys.modules if m.startswith('ppl_vae.')))"
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert "ppl_vae.training.config" in loaded
    wrong = {
        m
        for m in loaded
        if m.startswith(("ppl_vae.inference", "ppl_vae.reports"))
        or (
            m.startswith("ppl_vae.training.")
            and m not in ("ppl_vae.training.config", "ppl_vae.training.config_checks")
        )
    }
    assert not wrong, sorted(wrong)


def test_the_field_checks_cover_every_field_of_the_config():
    """``check_fields`` walks the type hints of the class: exactly its fields, each with a check."""
    assert set(field_types(FitConfig)) == {f.name for f in dataclasses.fields(FitConfig)}
    FitConfig().validate()  # a type without a check would be a KeyError here


def test_cuda_graph_is_opt_in():
    assert FitConfig().cuda_graph is False
    parse = build_parser().parse_args
    assert config_from_args(parse(["--cuda-graph"])).cuda_graph is True
    assert config_from_args(parse([])).cuda_graph is False
    # --no-cuda-graph switches capture off in a run saved with it on (--resume)
    assert config_from_args(parse(["--no-cuda-graph"]), FitConfig(cuda_graph=True)).cuda_graph is False


@pytest.mark.parametrize(
    "n_train,batch_size,epochs",
    [
        (50_000, 128, 10),  # MNIST: 391 steps per epoch; 10 epochs already give 3910 steps
        (1438, 128, 250),  # digits: 12 steps per epoch → ⌈3000 / 12⌉
        (8000, 128, 48),  # MNIST test images alone: 63 steps per epoch → ⌈3000 / 63⌉
        (20_000, 128, 20),  # circles: 157 steps per epoch
        (60, 128, 3000),  # one batch holds all the data: one step per epoch
        (1438, 64, 131),  # 23 steps per epoch
    ],
)
def test_default_epochs_give_enough_steps(n_train, batch_size, epochs):
    assert default_epochs(n_train, batch_size) == epochs
    steps_per_epoch = -(-n_train // min(batch_size, n_train))
    assert epochs * steps_per_epoch >= DEFAULT_MIN_STEPS and epochs >= DEFAULT_MIN_EPOCHS
    assert (
        epochs - 1
    ) * steps_per_epoch < DEFAULT_MIN_STEPS or epochs == DEFAULT_MIN_EPOCHS  # no more than needed


def test_with_data_defaults_fixes_only_what_was_not_given(tmp_path):
    cfg = FitConfig(dataset="digits")
    assert cfg.epochs is None
    fixed = cfg.with_data_defaults(1438)
    assert fixed.epochs == 250 and cfg.epochs is None  # a new config; the given one is unchanged
    assert FitConfig(epochs=3).with_data_defaults(1438).epochs == 3
    # what a run saves is the fixed value, and a --resume reads it back as given
    fixed.save(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["epochs"] == 250
    assert FitConfig.load(tmp_path / "config.json") == fixed


def test_save_load_round_trip_and_json_integers_for_floats(tmp_path):
    cfg = FitConfig(
        dataset="circles",
        hidden=[64, 32],
        z_dim=3,
        epochs=7,
        lr=3e-3,
        grad_clip=5.0,
        patience=2,
        image_shape=[1, 28, 28],
        cuda_graph=True,
    )
    cfg.save(tmp_path / "config.json")
    assert FitConfig.load(tmp_path / "config.json") == cfg
    # JSON writes 1.0 as 1: float fields take integers, and the loaded value is a float
    (tmp_path / "int.json").write_text(json.dumps({"lr": 1, "beta": 2, "grad_clip": 3}))
    loaded = FitConfig.load(tmp_path / "int.json")
    assert (loaded.lr, loaded.beta, loaded.grad_clip) == (1.0, 2.0, 3.0) and isinstance(loaded.lr, float)
    # keys a run of an earlier version did not write take their defaults
    (tmp_path / "old.json").write_text(json.dumps({"dataset": "digits", "epochs": 4}))
    assert FitConfig.load(tmp_path / "old.json") == FitConfig(dataset="digits", epochs=4)


# --------------------------------------------------------------------------- bad config.json

# (file content, what the one-line error must say after "run configuration <path>")
BAD_CONFIGS = {
    "null": ("null", " must hold a JSON object of settings, got null"),
    "list": ("[1, 2]", " must hold a JSON object of settings, got a list"),
    "invalid_json": (
        '{"z_dim": 20,',
        " is not valid JSON (Expecting property name enclosed in double quotes at line 1, column 14)",
    ),
    "not_utf8": (b"\xff\xfe\x00garbage", " is not a JSON text file (UnicodeDecodeError)"),
    "string_int": ('{"z_dim": "20"}', ': "z_dim" must be an integer or null, got "20" (a string)'),
    "bool_int": ('{"epochs": true}', ': "epochs" must be an integer or null, got true'),
    "float_int": ('{"batch_size": 64.5}', ': "batch_size" must be an integer, got 64.5'),
    "int_list": (
        '{"hidden": [400, "200"]}',
        ': "hidden" must be a list of integers or null, got [400, "200"] (a list)',
    ),
    "string_float": ('{"lr": "1e-3"}', ': "lr" must be a finite number, got "1e-3" (a string)'),
    "nan": ('{"beta": NaN}', ': "beta" must be a finite number, got NaN'),
    "null_required": ('{"dataset": null}', ': "dataset" must be a string, got null (null)'),
    "bool_field": ('{"cuda_graph": "yes"}', ': "cuda_graph" must be true or false, got "yes" (a string)'),
    "range": ('{"epochs": 0}', ': "epochs" must be >= 1, got 0'),
    "range_float": ('{"lr_decay": 2}', ': "lr_decay" must be in (0, 1], got 2.0'),
    "choice": ('{"elbo": "renyi"}', ': "elbo" must be one of trace, meanfield, iwae, got "renyi" (a string)'),
    "image_shape": (
        '{"image_shape": [28, 28]}',
        ': "image_shape" must be 3 sizes >= 1 (C, H, W), got [28, 28]',
    ),
    "unknown_key": ('{"z_dim": 20, "colour": "red"}', ": unknown keys ['colour']; known keys: ['activation'"),
    "iwae_beta": ('{"elbo": "iwae", "beta": 2}', ": --beta ≠ 1 makes --elbo iwae no bound on log p(x)"),
}


def write_config(folder, content):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_file_is_one_line_naming_file_and_field(tmp_path, case):
    content, expected = BAD_CONFIGS[case]
    path = write_config(tmp_path, content)
    with pytest.raises(UserError) as e:
        FitConfig.load(path)
    msg = str(e.value)
    assert msg.startswith(f"run configuration {path}{expected}"), msg
    assert "\n" not in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError) as e:
        FitConfig.load(tmp_path / "config.json")
    assert (
        str(e.value) == f"cannot read run configuration {tmp_path / 'config.json'}: No such file or directory"
    )


def test_every_field_is_type_checked():
    """validate() checks each field's type, so a field added later is covered too: a value of
    a type no field takes (a set; a dict is data_fingerprint's) is refused for every one of them."""
    for f in dataclasses.fields(FitConfig):
        with pytest.raises(UserError, match="must be"):
            FitConfig(**{f.name: {"a"}}).validate()
