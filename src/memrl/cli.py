"""``memrl <command>``: one subcommand per pipeline, each a typed config dataclass (tyro).

``--config PATH`` starts from a saved ``config.yaml``; flags on the command line override it.
``--resume RUN_DIR`` continues a run, starting from that run's ``config.yaml``.
Errors in what the user typed exit with status 2 and one clear message, never a traceback.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

import tyro

from memrl import __version__

# command -> (module, config class, entry function, one-line description); a command's module is
# imported only when it runs, so `memrl --help` stays fast.
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "demo": ("memrl.rl.demo", "DemoConfig", "run_demo",
             "PPO with and without memory on a POPGym task, side by side (what `make run` runs)"),
    "recall": ("memrl.recall", "RecallConfig", "train_recall",
               "train a core to recall an episode's first symbol (the smallest memory job)"),
    "ppo": ("memrl.rl.ppo", "PPOConfig", "train_ppo",
            "recurrent PPO on a POPGym, gymnasium or module:Class environment"),
    "board": ("memrl.rl.board", "BoardConfig", "run_board",
              "rank memory cores on POPGym: a resumable grid of ppo runs, a table and a heatmap"),
    "export": ("memrl.deploy", "ExportConfig", "export",
               "export one step of a ppo, bc or spatial policy, memory as explicit tensors"),
    "ppo-eval": ("memrl.rl.evaluate", "PPOEvalConfig", "run_ppo_eval",
                 "evaluate a PPO run, optionally resetting its memory every K steps"),
    "rssm": ("memrl.world_model.train", "RSSMTrainConfig", "train_rssm",
             "train an RSSM world model on the moving-dot world with occlusion"),
    "rssm-eval": ("memrl.world_model.evaluate", "RSSMEvalConfig", "run_rssm_eval",
                  "open-loop prediction error of an RSSM run against baselines, and a probe"),
    "push-collect": ("memrl.imitation.collect", "PushCollectConfig", "collect_push",
                     "record scripted-expert push demonstrations into an HDF5 file"),
    "bc": ("memrl.imitation.bc", "BCConfig", "train_bc",
           "behaviour cloning on push demonstrations (CNN / ResNet-18 / ViT, optional GRU)"),
    "act": ("memrl.imitation.act", "ACTConfig", "train_act",
            "action chunking transformer (ACT) on push demonstrations"),
    "imitation-eval": ("memrl.imitation.evaluate", "ImitationEvalConfig", "run_imitation_eval",
                       "success rate of a BC or ACT run on held-out push episodes"),
    "spatial": ("memrl.spatial.train", "SpatialConfig", "train_spatial",
                "spatial memory over feature maps, one training phase (pretrain, A, B or C)"),
    "spatial-eval": ("memrl.spatial.evaluate", "SpatialEvalConfig", "evaluate_spatial",
                     "dynamics, segmentation and push success of a spatial-memory run"),
}  # fmt: skip

USAGE = """usage: memrl <command> [--config PATH] [--resume RUN_DIR] [flags]
       memrl --version

commands:
{commands}

`memrl <command> --help` lists every flag of a command with its default and meaning.
"""


def _fail(message: str) -> int:
    print(f"memrl: error: {message}", file=sys.stderr)
    return 2


def _pop_option(args: list[str], name: str) -> tuple[str | None, list[str]]:
    """Remove ``name VALUE`` or ``name=VALUE`` from args; returns (VALUE or None, rest)."""
    rest, value, i = [], None, 0
    while i < len(args):
        arg = args[i]
        if arg == name:
            if i + 1 >= len(args):
                raise ValueError(f"{name} expects a value")
            value, i = args[i + 1], i + 2
            continue
        if arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return value, rest


def _spell_flags(args: Sequence[str], aliases: dict[str, str]) -> list[str]:
    """Accept ``--batch_size`` for ``--batch-size`` (the RSSM spec's spelling) and a config's own
    ``FLAG_ALIASES``; values are left alone."""
    spelled = []
    for arg in args:
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            name = name.replace("_", "-")
            arg = aliases.get(name, name) + eq + value
        spelled.append(arg)
    return spelled


def _option_value(args: Sequence[str], names: Sequence[str]) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    from memrl.runs import (
        CheckpointError,
        ConfigError,
        NonFiniteLossError,
        changed_flags,
        distributed,
        load_config,
    )

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        listing = "\n".join(f"  {name:<{width}}  {spec[3]}" for name, spec in COMMANDS.items())
        print(USAGE.format(commands=listing))
        return 0
    if args[0] in ("-V", "--version"):
        print(f"memrl {__version__}")
        return 0
    command, args = args[0], args[1:]
    if command not in COMMANDS:
        return _fail(f"unknown command {command!r}; expected one of: {', '.join(COMMANDS)}")
    module_name, class_name, function_name, _ = COMMANDS[command]
    module = importlib.import_module(module_name)
    config_cls, entry = getattr(module, class_name), getattr(module, function_name)

    args = _spell_flags(args, getattr(config_cls, "FLAG_ALIASES", {}))
    try:
        config_path, args = _pop_option(args, "--config")
    except ValueError as err:
        return _fail(str(err))
    resume = _option_value(args, ["--resume"])
    if config_path is None and resume is not None and "--help" not in args:
        if not Path(resume).is_dir():
            return _fail(f"--resume {resume}: no such run directory")
        config_path = str(Path(resume) / "config.yaml")
    try:
        default = load_config(config_cls, config_path) if config_path else None
    except ConfigError as err:
        return _fail(str(err))

    description = f"{(config_cls.__doc__ or '').strip()}\n\n" + (
        "--config PATH starts from a saved config.yaml (flags given here override it)."
    )
    resumable = getattr(config_cls, "RESUME_FLAGS", None)
    if resumable is not None:
        description += " With --resume RUN_DIR only these flags may differ from the run's: " + (
            ", ".join("--" + name.replace("_", "-") for name in resumable)
        )
    try:
        config = tyro.cli(
            config_cls,
            args=args,
            default=default,
            prog=f"memrl {command}",
            description=description,
        )
    except (ValueError, TypeError) as err:  # raised by a config's __post_init__ checks
        return _fail(str(err))
    if resumable is not None and config.resume is not None:
        try:
            saved = load_config(config_cls, Path(config.resume) / "config.yaml")
        except ConfigError as err:
            return _fail(f"--resume {config.resume}: {err}")
        if changed := changed_flags(config, saved, resumable):
            return _fail(
                f"--resume {config.resume}: {', '.join(changed)} would change the run's model "
                "or data; resume with the run's own values, or start a new run with --config "
                f"{Path(config.resume) / 'config.yaml'} --output-dir NEW_DIR"
            )
    try:
        entry(config)
        distributed.shutdown()  # under torchrun: wait for every rank, then leave the group
    except (ConfigError, CheckpointError) as err:
        return _fail(str(err))
    except NonFiniteLossError as err:
        print(f"memrl {command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nmemrl {command}: interrupted; resume with --resume RUN_DIR", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
