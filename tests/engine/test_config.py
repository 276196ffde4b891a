"""Configuration files: ``--config FILE`` (YAML, or a run's args.json, which replays the run)
under the command-line flags, ``--print_config`` (the resolved options as YAML that ``--config``
reads back), the one-line refusals of a bad file, and runs of both scripts driven by files."""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine.logger import ONE_INVOCATION, derived_options, recorded_args
from engine.methods import method_option_names
from engine.config import RECORDED_KEYS, config_text, value_text
import train_student
import train_teacher

ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC = ["--dataset", "synthetic", "--synthetic_classes", "4", "--synthetic_train", "16",
             "--synthetic_test", "4", "--batch_size", "8", "--device", "cpu", "--epochs", "1"]
TEACHER = "./save/models/resnet32x4_vanilla/ckpt_epoch_240.pth"  # parsing never opens it


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def typed(opt) -> dict:
    """The options with their types: 1 and 1.0 differ here (they name different run folders)."""
    return {key: (type(value).__name__, value) for key, value in vars(opt).items()}


def printed(main, argv: list[str], capsys, *how: str) -> str:
    """What ``main(argv + --print_config [how])`` prints; it must exit with status 0."""
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--print_config", *how])
    assert stop.value.code == 0
    return capsys.readouterr().out


def refusal(parse, argv: list[str], capsys) -> str:
    """The one ``error:`` line with which parsing ``argv`` stops (exit status 2)."""
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_precedence_defaults_then_file_then_flags(tmp_path):
    config = write(tmp_path / "c.yaml", "epochs: 7\nbatch_size: 16\nlr_schedule: cosine\ndeterministic: true\n"
                                        "learning_rate: 0.2\n")
    opt = train_teacher.parse_option(["--config", config, "--epochs", "3", "--model", "resnet8"])
    assert opt.epochs == 3  # the flag beats the file
    assert (opt.batch_size, opt.lr_schedule, opt.deterministic, opt.learning_rate) == (16, "cosine", True, 0.2)
    assert opt.momentum == 0.9 and opt.weight_decay == 5e-4 and opt.save_freq == 40  # defaults where neither gives one
    assert opt.model_name == "resnet8_cifar100_lr_0.2_decay_0.0005_trial_0"
    assert not hasattr(opt, "config")  # the options, not where they came from
    assert list(vars(opt)) == list(vars(train_teacher.parse_option([])))  # in the parser's order


def test_student_yaml_is_the_command_line(tmp_path):
    """A CRD recipe as a file (RepDistiller's -r -a -b as gamma/a/b keys) gives the namespace and
    the run folder of the same command line."""
    config = write(tmp_path / "crd.yaml", f"""
path_t: [{TEACHER}, ./save/models/wrn_40_2_vanilla/ckpt_epoch_240.pth]   # an ensemble, as a list
distill: crd
model_s: resnet8x4
gamma: 1.0
a: 0.0
b: 0.8
nce_k: 4096
nce_t: 0.1
mode: relax
lr_decay_epochs: [100, 150]
trial: 3
""")
    argv = ["--path_t", f"{TEACHER},./save/models/wrn_40_2_vanilla/ckpt_epoch_240.pth", "--distill", "crd",
            "--model_s", "resnet8x4", "-r", "1", "-a", "0", "-b", "0.8", "--nce_k", "4096", "--nce_t", "0.1",
            "--mode", "relax", "--lr_decay_epochs", "100,150", "--trial", "3"]
    from_file = train_student.parse_option(["--config", config])
    assert typed(from_file) == typed(train_student.parse_option(argv))
    assert (from_file.nce_k, from_file.gamma, from_file.alpha, from_file.beta) == (4096, 1.0, 0.0, 0.8)
    assert from_file.lr_decay_epochs == [100, 150]
    assert train_student.run_name(from_file, "resnet32x4") == "S:resnet8x4_T:resnet32x4_cifar100_crd_r:1.0_a:0.0_b:0.8_3"
    # the comma-separated string is the list's equal
    same = write(tmp_path / "same.yaml", Path(config).read_text().replace("[100, 150]", '"100,150"'))
    assert typed(train_student.parse_option(["--config", same])) == typed(from_file)


def test_left_out_weights_are_filled_and_a_flag_overrides_one(tmp_path):
    config = write(tmp_path / "c.yaml", f"path_t: {TEACHER}\ndistill: crd\nnce_k: 4096\n")
    opt = train_student.parse_option(["--config", config, "-b", "0.5"])
    # -a comes from CRD's published weights (its -b is 0.8, overridden here); -r left out is RepDistiller's int 1
    assert (opt.gamma, opt.alpha, opt.beta, opt.nce_k) == (1, 0.0, 0.5, 4096) and type(opt.gamma) is int


def test_yaml_booleans_are_true_and_false_only(tmp_path, capsys):
    opt = train_teacher.parse_option(["--config", write(tmp_path / "c.yaml", "amp: off\nchannels_last: true\n")])
    assert opt.amp == "off" and opt.channels_last is True  # YAML 1.1 would read off as False
    err = refusal(train_teacher.parse_option, ["--config", write(tmp_path / "d.yaml", "channels_last: yes\n")], capsys)
    assert "channels_last (--channels_last): expected true or false" in err


def test_null_is_the_default_where_the_default_is_none(tmp_path, capsys):
    opt = train_teacher.parse_option(["--config", write(tmp_path / "c.yaml", "resume: null\nlearning_rate: null\n")])
    assert opt.resume is None and opt.learning_rate == 0.05  # filled in as when the flag is left out
    err = refusal(train_teacher.parse_option, ["--config", write(tmp_path / "d.yaml", "epochs: null\n")], capsys)
    assert "epochs (--epochs): expected a value, got null" in err


BAD = [  # file text, what the one error line says
    ("nce_k: 0\n", "nce_k (--nce_k): expected an integer >= 1, got '0'"),
    ("nce_k: 4096.5\n", "nce_k (--nce_k): expected an integer, got '4096.5'"),
    ("nce_k: many\n", "nce_k (--nce_k): expected an integer, got 'many'"),
    ("nce_t: -0.1\n", "nce_t (--nce_t): expected a finite number > 0, got '-0.1'"),
    ("momentum: 1\n", "momentum (--momentum): expected a finite number in [0, 1), got '1'"),
    ("b: -1\n", "b (-b/--beta): expected a finite number >= 0, got '-1'"),
    ("kd_T: .nan\n", "kd_T (--kd_T): expected a finite number > 0, got 'nan'"),
    ("amp: fp8\n", "amp (--amp): invalid choice: 'fp8' (choose from 'off', 'bf16', 'fp16')"),
    ("hint_layer: 7\n", "hint_layer (--hint_layer): invalid choice: 7"),
    ("trial: a/b\n", "trial (--trial):"),
    ("epochs: [1, 2]\n", "epochs (--epochs): expected one value, got [1, 2]"),
    ("epochs: true\n", "epochs (--epochs): expected one value, got true"),
    ("nce_kk: 4096\n", "unknown option 'nce_kk'; did you mean 'nce_k'?"),
    ("learning-rate: 0.1\n", "unknown option 'learning-rate'; did you mean 'learning_rate'?"),
    ("model: resnet8\n", "unknown option 'model'"),  # train_teacher's option, not train_student's
    ("beta: 0.8\nb: 0.9\n", "'beta' and 'b' both set -b/--beta"),
    ("nce_k: 1\nnce_k: 2\n", "not valid YAML (key 'nce_k' given twice, line 2, column 1)"),
    ("nce_k: [1\n", "not valid YAML (expected ',' or ']'"),
    ("- nce_k\n", "expected a mapping of option names to values (nce_k: 4096), got list"),
    ("config: other.yaml\n", "'config' cannot be set in a configuration file"),
    ("arch: resnet8\n", "unknown option 'arch'"),  # recorded keys are ignored in an args.json only
    # floats that float32 (training's arithmetic) cannot hold, as on the command line (tests/engine/test_flags.py)
    ("learning_rate: 1e300\n", "learning_rate (--learning_rate): expected a finite number > 0 that float32 holds "
                               "(|x| <= 3.403e+38), got '1e300'"),
    ("b: 1.0e+39\n", "b (-b/--beta): expected a finite number >= 0 that float32 holds (|x| <= 3.403e+38), got '1e+39'"),
    ("nce_t: 1e-50\n", "nce_t (--nce_t): expected a finite number > 0, got '1e-50', which is 0 in float32 (its "
                       "smallest positive number is 1.401e-45)"),
    ("weight_decay: -1e300\n", "weight_decay (--weight_decay): expected a finite number >= 0, got '-1e300'"),
    ("dcd_init_tau: -1.0e+300\n", "dcd_init_tau (--dcd_init_tau): expected a finite number that float32 holds "
                                  "(|x| <= 3.403e+38), got '-1e+300'"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_a_bad_file_is_one_line_naming_the_file_and_key(text, message, tmp_path, capsys):
    config = write(tmp_path / "bad.yaml", text)
    err = refusal(train_student.parse_option, ["--config", config, "--path_t", TEACHER], capsys)
    assert err.startswith(f"error: --config {config}: {message}"), err


def test_missing_folder_or_repeated_config_file(tmp_path, capsys):
    err = refusal(train_student.parse_option, ["--config", str(tmp_path / "nothere.yaml")], capsys)
    assert err.startswith(f"error: --config {tmp_path / 'nothere.yaml'}: no such file")
    err = refusal(train_student.parse_option, ["--config", str(tmp_path)], capsys)
    assert "is a folder, not a file" in err
    config = write(tmp_path / "c.yaml", "nce_k: 4096\n")
    assert "--config may be given once" in refusal(train_student.parse_option, ["--config", config, "--config", config],
                                                   capsys)
    err = refusal(train_student.parse_option, ["--config", write(tmp_path / "c.json", '{"nce_k": 1, "nce_k": 2}')],
                  capsys)
    assert "key 'nce_k' given twice" in err
    assert "not valid JSON" in refusal(train_student.parse_option, ["--config", write(tmp_path / "d.json", "{")],
                                       capsys)


def test_float32_range_in_an_args_json_and_normal_values(tmp_path, capsys):
    err = refusal(train_student.parse_option, ["--config", write(tmp_path / "args.json", '{"kd_T": 1e-50}'),
                                               "--path_t", TEACHER], capsys)
    assert err == (f"error: --config {tmp_path / 'args.json'}: kd_T (--kd_T): expected a finite number > 0, got "
                   "'1e-50', which is 0 in float32 (its smallest positive number is 1.401e-45) (see --help)\n")
    config = write(tmp_path / "ok.yaml", "learning_rate: 0.05\nweight_decay: 1.0e-4\nb: 3.4e38\nnce_t: 1e-45\n")
    opt = train_student.parse_option(["--config", config, "--path_t", TEACHER])
    assert (opt.learning_rate, opt.weight_decay, opt.beta, opt.nce_t) == (0.05, 1e-4, 3.4e38, 1e-45)


def billion_laughs(levels: int = 9) -> str:
    """The "billion laughs": each level a list of nine aliases of the one before (9**9 strings)."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    names = "abcdefghijklmnopqrstuvwxyz"
    for up, down in zip(names[1:levels], names[:levels - 1]):
        lines.append(f"{up}: &{up} [{','.join([f'*{down}'] * 9)}]")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    text = billion_laughs()
    assert len(text) < 520 and text.count("*") == 72
    config = write(tmp_path / "bomb.yaml", text)
    started = time.perf_counter()
    err = refusal(train_teacher.parse_option, ["--config", config], capsys)
    assert time.perf_counter() - started < 0.5
    assert err == (f"error: --config {config}: line 2, column 8: a YAML alias (*a) cannot be used in a configuration "
                   "file; write the value out (see --help)\n")
    # an alias of a scalar, too (a configuration file never needs one)
    err = refusal(train_teacher.parse_option, ["--config", write(tmp_path / "a.yaml", "epochs: &e 3\nsave_freq: *e\n")],
                  capsys)
    assert "line 2, column 12: a YAML alias (*e) cannot be used" in err


@pytest.mark.parametrize("name, text, where", [
    ("flow.yaml", "epochs: " + "[" * 100_000 + "]" * 100_000 + "\n", "line 1, column 18: "),
    ("block.yaml", "".join(" " * i + f"k{i}:\n" for i in range(1000)), "line 11, column 11: "),
    ("deep.json", '{"epochs": ' + "[" * 100_000 + "]" * 100_000 + "}", ""),
    ("deep11.json", '{"epochs": ' + "[" * 10 + "]" * 10 + "}", ""),  # one level too deep
], ids=["yaml-flow", "yaml-block", "json", "json-11"])
def test_deep_nesting_is_one_line(name, text, where, tmp_path, capsys):
    config = write(tmp_path / name, text)
    err = refusal(train_teacher.parse_option, ["--config", config], capsys)
    kind = "objects" if name.endswith(".json") else "mappings"
    assert err.startswith(f"error: --config {config}: {where}lists or {kind} nested deeper than 10 levels; "), err


def test_ten_levels_are_read(tmp_path, capsys):
    """The bound is ten levels: a mapping holding nine lists gets the option's own refusal."""
    for name, text in (("ten.yaml", "epochs: " + "[" * 9 + "1" + "]" * 9 + "\n"),
                       ("ten.json", '{"epochs": ' + "[" * 9 + "1" + "]" * 9 + "}")):
        err = refusal(train_teacher.parse_option, ["--config", write(tmp_path / name, text)], capsys)
        assert f"epochs (--epochs): expected one value, got {'[' * 9}1{']' * 9}" in err, err


def test_a_large_file_and_too_many_values_are_refused(tmp_path, capsys):
    config = write(tmp_path / "big.yaml", "# " + "x" * (1 << 20) + "\n")
    assert refusal(train_teacher.parse_option, ["--config", config], capsys) == (
        f"error: --config {config}: larger than 1 MiB; a configuration file holds option: value lines (is it the "
        "right file?) (see --help)\n")
    config = write(tmp_path / "many.yaml", "lr_decay_epochs: [" + ", ".join(["1"] * 6000) + "]\n")
    err = refusal(train_teacher.parse_option, ["--config", config], capsys)
    assert "more than 5,000 keys, values and list items; a configuration file holds option: value lines" in err


def test_messages_show_a_bounded_part_of_a_huge_value(tmp_path, capsys):
    """A message never repeats a whole value or key (a long one is cut, and its length given)."""
    cases = [
        ("value.yaml", "learning_rate: " + "9" * 200_000 + "x\n",
         "learning_rate (--learning_rate): expected a number, got '" + "9" * 40 + "'... (200,001 characters)"),
        ("key.json", '{"' + "k" * 200_000 + '": 1}', "unknown option '" + "k" * 40 + "'... (200,000 characters)"),
        ("twice.json", '{"' + "k" * 9_000 + '": 1, "' + "k" * 9_000 + '": 2}', "key '" + "k" * 40 + "'... "),
        ("list.yaml", "epochs: [" + ", ".join(["123456789"] * 4000) + "]\n", "got [123456789, 123456789, "),
        ("switch.yaml", "deterministic: " + "y" * 100_000 + "\n", "expected true or false (a switch), got 'yyy"),
        ("int.yaml", "epochs: " + "9" * 5000 + "\n", "an integer of more than 4300 digits; no option takes one"),
    ]
    for name, text, message in cases:
        config = write(tmp_path / name, text)
        err = refusal(train_teacher.parse_option, ["--config", config], capsys)
        assert err.startswith(f"error: --config {config}: ") and message in err, err
        assert len(err) < len(config) + 250, err


def test_value_text_and_the_printed_config_have_no_alias():
    assert value_text([1, "a", None, True, {"k": [2.5]}]) == "[1, 'a', null, true, {'k': [2.5]}]"
    nested = [["x" * 1000] * 1000] * 1000  # a billion characters if rendered whole
    shown = value_text(nested)
    assert shown.startswith("[['" + "x" * 40 + "'... (1,000 characters), ") and len(shown) == 83
    shared = [150, 180]
    text = config_text({"lr_decay_epochs": shared, "path_t": shared})
    assert text == "lr_decay_epochs: [150, 180]\npath_t: [150, 180]\n"  # written out twice, never &id001/*id001


def test_the_alias_bomb_from_the_shell_is_one_line(tmp_path):
    config = write(tmp_path / "bomb.yaml", billion_laughs())
    out = subprocess.run([sys.executable, "train_teacher.py", "--config", config], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr
    assert out.stderr == (f"error: --config {config}: line 2, column 8: a YAML alias (*a) cannot be used in a "
                          "configuration file; write the value out (see --help)\n")


def test_a_bad_file_from_the_shell_is_one_line(tmp_path):
    config = write(tmp_path / "bad.yaml", "distill: crd\nnce_k: -5\n")
    out = subprocess.run([sys.executable, "train_student.py", "--config", config, "--path_t", TEACHER], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"error: --config {config}: nce_k (--nce_k): expected an integer >= 1, got '-5' (see --help)\n"


@pytest.mark.parametrize("how", [(), ("all",)], ids=["method", "all"])
@pytest.mark.parametrize("script, argv", [
    (train_student, ["--path_t", TEACHER, "--distill", "crd", "--model_s", "MobileNetV2", "-a", "0",
                     "--nce_k", "4096", "--lr_decay_epochs", "30,60", "--amp", "bf16", "--trial", "007",
                     "--weight_decay", "1e-4", "--overwrite", "--dataset", "synthetic"]),
    (train_student, ["--path_t", TEACHER, "--distill", "dkd", "--kd_T", "2"]),
    (train_teacher, ["--model", "wrn_40_2", "--learning_rate", "1", "--lr_decay_epochs", "", "--trial", "5",
                     "--seed", "-3", "--data_folder", "/data/c100"]),
], ids=["student-crd", "student-dkd", "teacher"])
def test_print_config_round_trip(script, argv, how, tmp_path, capsys, monkeypatch):
    """--print_config's output (the chosen method's options; with 'all' every method's), given
    back to --config, resolves to the same options, types included (the -r 1 RepDistiller leaves an
    int, -r 1.0 given, kd_T's int default), and the printing writes nothing."""
    monkeypatch.chdir(tmp_path)
    text = printed(script.main, argv, capsys, *how)
    assert list(tmp_path.iterdir()) == []  # nothing built or written
    values = yaml.safe_load(text)
    expected = script.parse_option(argv)
    capsys.readouterr()
    # --resume and --overwrite act on one invocation: never printed, never replayed
    # derived options (left out, filled in: seed, learning rate, published weights) are null
    derived = derived_options(expected)
    options = {k: None if k in derived else v for k, v in vars(expected).items()
               if k not in RECORDED_KEYS | ONE_INVOCATION and not k.startswith("_")}
    if script is train_student and how != ("all",):  # the other methods' options are left out
        options = {k: v for k, v in options.items()
                   if k not in method_option_names() - method_option_names(expected.distill)}
    assert values == options
    again = script.parse_option(["--config", write(tmp_path / "printed.yaml", text)])
    capsys.readouterr()
    assert again.overwrite is False and again.resume is None
    assert typed(again) == {**typed(expected), **typed(argparse.Namespace(overwrite=False, resume=None))}
    # printing what the file gives prints the same file, notes included (the same values are filled in)
    assert printed(script.main, ["--config", str(tmp_path / "printed.yaml")], capsys, *how) == text


def method_keys(values: dict) -> set[str]:
    return set(values) & method_option_names()


def test_print_config_prints_the_chosen_methods_options(capsys):
    """--print_config (first, last, or before other flags) prints the shared options and the
    chosen method's; 'all' every method's; another method's option given a value is kept (the
    file then replays the same options); a bad choice is one line."""
    argv = ["--path_t", TEACHER, "--distill", "crd"]
    last = yaml.safe_load(printed(train_student.main, argv, capsys))
    assert method_keys(last) == {"feat_dim", "nce_m", "nce_scores", "nce_k", "nce_t", "nce_z_momentum", "mode"}
    assert {"init_epochs", "kd_T", "epochs", "tb_freq"} <= set(last)  # the shared ones
    for first in (["--print_config", *argv], ["--path_t", TEACHER, "--print_config", "--distill", "crd"]):
        with pytest.raises(SystemExit) as stop:
            train_student.main(first)
        assert stop.value.code == 0 and yaml.safe_load(capsys.readouterr().out) == last
    with pytest.raises(SystemExit):
        train_student.main(["--print_config", "all", *argv])
    everything = yaml.safe_load(capsys.readouterr().out)
    assert everything == yaml.safe_load(printed(train_student.main, argv, capsys, "all"))
    assert method_keys(everything) == method_option_names() and {**everything, **last} == everything
    kd = yaml.safe_load(printed(train_student.main, ["--path_t", TEACHER, "--dkd_T", "2"], capsys))
    assert method_keys(kd) == {"dkd_T"} and kd["dkd_T"] == 2.0 and kd["distill"] == "kd"
    with pytest.raises(SystemExit) as stop:
        train_student.main([*argv, "--print_config", "every"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("error: argument --print_config: invalid choice: 'every' (choose from "
                                       "'method', 'all') (see --help)\n")
    # train_teacher.py has no method: both print every option
    teacher = printed(train_teacher.main, [], capsys)
    assert teacher == printed(train_teacher.main, [], capsys, "all") and "tb_freq: 500\n" in teacher


def test_print_config_notes_are_comments(capsys):
    text = printed(train_student.main, ["--path_t", TEACHER, "--distill", "crd"], capsys)
    first = text.splitlines()[0]
    assert first == "# --distill crd: using its published weights -r 1 -a 0 -b 0.8"
    # what is filled in is said in the notes and left null, so that a file of it derives it again
    assert text.splitlines()[1] == ("# left out, so derived when it runs (null below): learning_rate 0.05, "
                                    "num_workers 0, seed 1, gamma 1, alpha 0.0, beta 0.8")
    values = yaml.safe_load(text)
    assert (values["gamma"], values["alpha"], values["beta"], values["learning_rate"], values["seed"]) == (None,) * 5
    assert values["lr_decay_epochs"] == [150, 180, 210] and values["trial"] == "1" and values["nce_k"] == 16384
    assert "lr_decay_epochs: [150, 180, 210]\n" in text and "amp: 'off'\n" in text


def test_print_config_of_a_bad_command_line_is_its_error(capsys):
    with pytest.raises(SystemExit) as stop:
        train_student.main(["--distill", "crd", "--print_config"])  # no --path_t
    assert stop.value.code == 2 and capsys.readouterr().err.startswith("error: --path_t is required")


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny train_teacher.py run: its folder (args.json, checkpoints)."""
    save = tmp_path_factory.mktemp("teacher")
    train_teacher.main(["--model", "resnet8", *SYNTHETIC, "--save_folder", str(save)])
    return save / "resnet8_synthetic_lr_0.05_decay_0.0005_trial_0"


@pytest.mark.e2e
def test_args_json_replays_the_run(teacher_run, capsys):
    recorded = json.loads((teacher_run / "args.json").read_text())
    assert {"arch", "model_name", "save_path", "command"} <= set(recorded)
    # what was left out and filled in is recorded with its value and listed as derived
    assert recorded["derived"] == ["learning_rate", "num_workers", "seed"] and recorded["seed"] == 0
    args = str(teacher_run / "args.json")
    values = yaml.safe_load(printed(train_teacher.main, ["--config", args], capsys))
    assert values == {k: None if k in recorded["derived"] else v for k, v in recorded.items()
                      if k not in RECORDED_KEYS}
    assert values["lr_decay_epochs"] == [150, 180, 210] and values["synthetic_classes"] == 4
    # the replay's options are the run's, derived ones derived again (its folder is the run's)
    replay = train_teacher.parse_option(["--config", args])
    assert replay.print_config is False  # main leaves it out of a run's options
    del replay.print_config
    assert not ONE_INVOCATION & set(recorded)  # acts of one invocation: not recorded, never replayed
    assert recorded_args(vars(replay)) == {k: v for k, v in recorded.items() if k != "command"}
    assert train_teacher.parse_option(["--config", args, "--trial", "1"]).save_path.endswith("_trial_1")


@pytest.mark.e2e
def test_a_replay_as_another_trial_gets_its_own_seed(teacher_run, tmp_path, capsys):
    """The seed trial 0 derived is not replayed as a setting: trial 1 of the same file gets seed 1
    and other draws (another history); an explicit --seed is kept, with a warning that the new
    trial repeats the old one's draws; an earlier version's args.json (no 'derived' list) too."""
    args = str(teacher_run / "args.json")
    first = json.loads((teacher_run / "results.json").read_text())
    capsys.readouterr()
    values = yaml.safe_load(printed(train_teacher.main, ["--config", args, "--trial", "1"], capsys))
    assert values["seed"] is None and str(values["trial"]) == "1"
    second = train_teacher.main(["--config", args, "--trial", "1", "--save_folder", str(tmp_path)])
    assert (first["seed"], second["seed"]) == (0, 1)
    assert second["history"][0]["train_loss"] != first["history"][0]["train_loss"]
    assert "warning" not in capsys.readouterr().err
    # an earlier version recorded the derived seed as a setting, without a 'derived' list
    legacy = json.loads((teacher_run / "args.json").read_text())
    del legacy["derived"]
    legacy_file = write(tmp_path / "legacy.json", json.dumps(legacy))
    assert train_teacher.parse_option(["--config", legacy_file, "--trial", "2"]).seed == 2
    # a seed the run was given stays given: a new trial then repeats its draws, and is told so
    explicit = {**legacy, "seed": 5, "command": [*legacy["command"], "--seed", "5"]}
    explicit_file = write(tmp_path / "explicit.json", json.dumps(explicit))
    capsys.readouterr()
    assert train_teacher.parse_option(["--config", explicit_file, "--trial", "2"]).seed == 5
    err = capsys.readouterr().err
    assert err == (f"warning: --config {explicit_file}: --trial 2 runs with seed 5, the seed of its trial 0, so it "
                   "repeats that run's draws; give --seed for another one\n")


@pytest.mark.e2e
def test_student_run_from_a_yaml_file_and_its_replay(teacher_run, tmp_path, capsys):
    """train_student.py driven by a YAML file (CRD, -r left out), then its args.json: the replay
    names the same run folder (r:1, RepDistiller's left-out -r) with the same options."""
    save = tmp_path / "students"
    config = write(tmp_path / "crd.yaml", f"""
path_t: {teacher_run / 'resnet8_last.pth'}
distill: crd
model_s: resnet8
a: 0.0
b: 0.8
nce_k: 16
feat_dim: 8
dataset: synthetic
synthetic_classes: 4
synthetic_train: 16
synthetic_test: 4
batch_size: 8
device: cpu
epochs: 1
save_folder: {save}
""")
    results = train_student.main(["--config", config, "--max_steps", "2"])
    assert results["steps"] == 2 and results["method"] == "crd" and results["last_acc"] is not None
    assert results["weights"] == {"gamma": 1, "alpha": 0.0, "beta": 0.8}
    folder = save / "S:resnet8_T:resnet8_synthetic_crd_r:1_a:0.0_b:0.8_1"
    recorded = json.loads((folder / "args.json").read_text())
    assert (recorded["nce_k"], recorded["feat_dim"], recorded["max_steps"], recorded["gamma"]) == (16, 8, 2, 1)
    capsys.readouterr()
    assert recorded["derived"] == ["gamma", "learning_rate", "num_workers", "seed"]
    replay = train_student.parse_option(["--config", str(folder / "args.json")])
    del replay.print_config  # main leaves it out of a run's options
    assert typed(argparse.Namespace(**recorded_args(vars(replay)))) == typed(
        argparse.Namespace(**{k: v for k, v in recorded.items() if k != "command"}))
    assert save / train_student.run_name(replay, "resnet8") == folder


def usage_section() -> str:
    text = (ROOT / "docs" / "usage.md").read_text()
    return text[text.index("## Configuration files"):text.index("## Flag reference")]


def test_the_usage_example_works_as_written(tmp_path, capsys, monkeypatch):
    """docs/usage.md's crd.yaml and the commands that use it (a ```sh block: tests/scripts/test_docs.py
    runs ```bash blocks in a folder without the file)."""
    section = usage_section()
    config = re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1)
    commands = [shlex.split(line, comments=True)
                for line in re.search(r"```sh\n(.*?)```", section, re.DOTALL).group(1).splitlines()]
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "crd.yaml", config)
    assert [c[:2] for c in commands] == [["python", "train_student.py"]] * 2
    opt = train_student.parse_option(commands[0][2:])
    assert (opt.distill, opt.model_s, opt.alpha, opt.beta, opt.nce_k, opt.trial) == ("crd", "resnet8x4", 0.0, 0.8,
                                                                                     4096, "2")
    assert train_student.run_name(opt, "resnet32x4") == "S:resnet8x4_T:resnet32x4_cifar100_crd_r:1_a:0.0_b:0.8_2"
    values = yaml.safe_load(printed(train_student.main, commands[1][2:-1], capsys))
    # the file is the command line the section's ```bash block prints
    bash = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1).replace("\\\n", " ")
    argv = shlex.split(bash.splitlines()[1].split(" | ")[0])[2:]
    assert values == yaml.safe_load(printed(train_student.main, argv[:-1], capsys))


def test_a_yaml_file_names_the_folder_the_command_line_names(tmp_path):
    """A number in a YAML file is the flag given on the command line: `r: 1`, `b: 0` name the
    folder `-r 1 -b 0` names (r:1.0, b:0.0, RepDistiller's spelling); left out, -r is its int 1
    (r:1), and a flag's own integer default (kd_T: 4) stays an integer."""
    flags = ["--path_t", TEACHER, "--distill", "kd"]
    for text, argv, name in [
        ("r: 1\na: 0.9\nb: 0\nkd_T: 4\n", ["-r", "1", "-a", "0.9", "-b", "0"], "r:1.0_a:0.9_b:0.0"),
        ("a: 0\nb: 0.8\n", ["-a", "0", "-b", "0.8"], "r:1_a:0.0_b:0.8"),
    ]:
        from_file = train_student.parse_option(flags + ["--config", write(tmp_path / "w.yaml", text)])
        from_flags = train_student.parse_option(flags + argv)
        assert train_student.run_name(from_file, "resnet32x4") == train_student.run_name(from_flags, "resnet32x4")
        assert f"_kd_{name}_1" in train_student.run_name(from_file, "resnet32x4")
        assert type(from_file.kd_T) is int and from_file.kd_T == 4
