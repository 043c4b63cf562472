# Start-up validation of command-line overrides: one clear line and exit code 2, no traceback.
"""Hydra reports a bad override with a multi-line message and exit code 1, and only after
logging has started. mmgen composes every requested configuration first (every combination of
a ``-m`` sweep, up to a limit) with Hydra's own parser and compose API, converts it into the
typed dataclasses, runs the cross-field checks, and stops at the first problem."""
from __future__ import annotations

import itertools
import os
import re
import sys
from pathlib import Path
from typing import Sequence

MAX_SWEEP_CHECK = 64


def config_dir() -> Path:
    """The repository's ``configs/`` (editable install), or ``$MMGEN_CONFIG_DIR``."""
    env = os.environ.get("MMGEN_CONFIG_DIR")
    if env:
        return Path(env).resolve()
    return (Path(__file__).resolve().parents[2] / "configs").resolve()


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("patch_dim"):
        # the codec's payload_dim: keeps model.patch_dim in step with data.codec / data.patch_size
        OmegaConf.register_new_resolver("patch_dim", _payload_dim)
    if not OmegaConf.has_resolver("objective_heads"):
        from mmgen.objectives import objective_heads

        # model.heads = the heads the objective trains (mmgen/models/README.md)
        OmegaConf.register_new_resolver("objective_heads", objective_heads)
    if not OmegaConf.has_resolver("hf_model"):
        from mmgen.models.hf.config import hf_field, hf_vocab

        # model=hf: the shape of a Hugging Face model directory's config.json (docs/pretrained.md)
        OmegaConf.register_new_resolver("hf_model", hf_field)
        OmegaConf.register_new_resolver("hf_vocab", hf_vocab)
    if not OmegaConf.has_resolver("objective_family"):
        from mmgen.objectives import objective_family

        # model.family = what the objective trains (objective=vae / vq: mmgen's own codecs)
        OmegaConf.register_new_resolver("objective_family", objective_family)
    if not OmegaConf.has_resolver("codes_end"):
        # objective.mask_id of masked_vq: the first id above the codec's codes
        OmegaConf.register_new_resolver("codes_end", _codes_end)


def _codes_end(tokenizer: str, codec: str, patch_size) -> int:
    from mmgen.models.codecs import build_codec
    from mmgen.models.tokenizers import build_tokenizer

    # a continuous codec has no codes (0): the start-up check then refuses it for masked_vq
    codes = int(getattr(build_codec(str(codec), int(patch_size)), "codebook_size", 0) or 0)
    return build_tokenizer(str(tokenizer)).vocab_size + codes


def _payload_dim(codec: str, patch_size) -> int:
    from mmgen.models.codecs import build_codec

    return build_codec(str(codec), int(patch_size)).payload_dim


def one_line(exc: BaseException) -> str:
    """Condense Hydra/OmegaConf errors (often multi-line, chained) into one line."""
    from hydra.errors import MissingConfigException

    if isinstance(exc, MissingConfigException) and exc.options:
        first = str(exc).strip().splitlines()[0]
        return f"{first} (available: {', '.join(sorted(exc.options))})"
    yaml_error = _yaml_syntax_error(exc)
    if yaml_error:
        return yaml_error
    parts, seen = [], set()
    e: BaseException | None = exc
    while e is not None and len(parts) < 3:
        lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
        head = next((l for l in lines if not l.startswith(("To append", "full_key", "object_type",
                                                          "reference_type", "Set the environment"))), "")
        key = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("full_key:")), "")
        # OmegaConf chains an unformatted copy ("Value '$VALUE' ..."); ANTLR's lexer error
        # arrives as "LexerNoViableAltException: ..." plus a repr of the same exception
        if "$VALUE" in head or "$KEY" in head or head.startswith("LexerNoViableAltException("):
            head = ""
        head = head.replace("LexerNoViableAltException: ", "Error parsing override: ")
        head = "" if head == "None" else head  # ANTLR errors chain a message-less cause
        if head and head not in seen:
            seen.add(head)
            parts.append(head + (f" (key: {key})" if key and key not in head else ""))
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return " ".join(parts) if parts else type(exc).__name__


def _yaml_syntax_error(exc: BaseException) -> str:
    """PyYAML's error (somewhere in the chain) as one line with the file, line and column; its
    first line alone ("while parsing a flow sequence") names neither."""
    import yaml

    e: BaseException | None = exc
    while e is not None and not isinstance(e, yaml.MarkedYAMLError):
        e = e.__cause__ or e.__context__
    if e is None:
        return ""
    mark = e.problem_mark or e.context_mark
    if mark is None:
        return f"YAML syntax error: {e.problem or e.context or e}"

    def at(m) -> str:
        return f"line {m.line + 1}, column {m.column + 1}"

    problem = e.problem or e.context or "invalid YAML"
    context = ""
    if e.context and e.problem:
        context = f" ({e.context}" + (f" at {at(e.context_mark)}" if e.context_mark else "") + ")"
    return f"YAML syntax error in {mark.name}, {at(mark)}: {problem}{context}"


def _combinations(overrides: list[str], multirun: bool) -> list[list[str]]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    if not multirun:
        return [overrides]
    choices = []
    for ov in parsed:
        if ov.is_sweep_override():
            key = ov.get_key_element()
            choices.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            choices.append([ov.input_line])
    return [list(c) for c in itertools.islice(itertools.product(*choices), MAX_SWEEP_CHECK)]


def check_group_options(overrides: list[str], config_dirs: Sequence[str | Path] = ()) -> None:
    """``group=option`` must name a file in ``configs/<group>/`` (or in a ``--config-dir``) or a
    registered option (model flavors): Hydra silently skips a missing option of an ``optional``
    default (``experiment=nope`` would train the defaults)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mmgen.compose import group_options

    roots = [config_dir(), *(Path(d) for d in config_dirs)]
    for ov in OverridesParser.create().parse_overrides(overrides):
        group, value = ov.key_or_group, ov.value()
        if (not group or group.startswith("hydra") or ov.is_delete() or ov.package
                or not isinstance(value, str) or "." in group):
            continue  # hydra/* options also come from plugins (ConfigStore), not only files
        registered = group_options(group)
        if not any((r / group).is_dir() for r in roots) and not registered:
            continue
        options = sorted({p.stem for r in roots for p in (r / group).glob("*.yaml")} | set(registered))
        if value not in options:
            raise ValueError(f"Could not find '{group}/{value}' (available: {', '.join(options)})")


def extra_config_dirs(config_dir_arg: str | None) -> list[Path]:
    """Hydra's ``--config-dir DIR`` (a directory added to the search path, after configs/):
    the directory as an absolute path, or ValueError (one line) if there is none."""
    if not config_dir_arg:
        return []
    path = Path(config_dir_arg).expanduser().resolve()
    if not path.is_dir():
        raise ValueError(f"--config-dir {config_dir_arg}: no such directory")
    return [path]


# `+data.sources.NAME=VALUE` and `+data.sources.NAME.FIELD=VALUE` (one `+` or two)
_SOURCE_ADD = re.compile(r"^(\+\+?)data\.sources\.([A-Za-z0-9_-]+)((?:\.[A-Za-z_][A-Za-z0-9_]*)*)=(.*)$", re.S)


def source_overrides(overrides: list[str]) -> list[str]:
    """Adding a source on the command line, ``+data.sources.clips={type:video,shards:...}``,
    fails inside OmegaConf: it cannot assign a mapping to a new key of a dict of dataclasses
    (``dict[str, SourceConfig]``), though it can merge one. Such an override (and the per-field
    form ``+data.sources.clips.shards=...``) is rewritten into the merge Hydra applies with
    the same meaning, ``+data.sources={clips:{...}}``: the fields are type-checked against
    SourceConfig as in a YAML file. Sweeps and anything that would not parse stay as given.

    Args:
        overrides: command-line arguments (Hydra flags pass through unchanged).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mmgen.models.hf.config import hf_model_overrides

    parser = OverridesParser.create()
    out = []
    for ov in hf_model_overrides(list(overrides)):
        m = _SOURCE_ADD.match(ov)
        if m:
            plus, name, path, value = m.groups()
            for key in reversed(path.split(".")[1:]):
                value = f"{{{key}:{value}}}"
            merged = f"{plus}data.sources={{{name}:{value}}}"
            try:
                if not parser.parse_override(ov).is_sweep_override():
                    parser.parse_override(merged)
                    ov = merged
            except Exception:  # noqa: BLE001 - Hydra reports the original override as it was
                pass
        out.append(ov)
    return out


def compose_job(overrides: list[str], config_name: str = "config", config_dirs: Sequence[str | Path] = ()):
    """Compose + convert + validate one configuration; raises on any problem.

    Args:
        overrides: Hydra overrides (``key=value``, ``group=option``, ``+key=value``).
        config_name: the primary config in configs/ (``--config-name``).
        config_dirs: extra config directories searched after configs/, as Hydra's
            ``--config-dir`` adds them (a user's ``experiment/``, ``data/`` ... YAMLs).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mmgen.compose import register_configs, to_job_config

    overrides = source_overrides(list(overrides))
    check_group_options(overrides, config_dirs)
    register_resolvers()
    register_configs()
    GlobalHydra.instance().clear()
    # what Hydra's --config-dir does for a real run: search these after configs/
    dirs = ",".join(f"file://{Path(d).resolve()}" for d in config_dirs)
    search = [f"hydra.searchpath=[{dirs}]"] if config_dirs else []
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=[*overrides, *search], return_hydra_config=True)
        return to_job_config(cfg)


def check_overrides(argv: list[str], prog: str = "mmgen-train") -> list[str]:
    """Validate the overrides in ``argv`` (Hydra's own flags are understood); exit 2 if bad.
    Returns ``argv`` as Hydra should receive it (``source_overrides``)."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def one_line_error(message: str):  # argparse would print its whole usage block
        print(f"{prog}: error: {message} (see {prog} --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = one_line_error
    args = parser.parse_args(argv)
    typed = list(argv)
    argv = source_overrides(typed)
    if args.help or args.hydra_help or args.shell_completion or args.info:
        return argv
    try:
        dirs = extra_config_dirs(args.config_dir)
        for combo in _combinations(list(args.overrides), bool(args.multirun)):
            compose_job(combo, config_name=args.config_name or "config", config_dirs=dirs)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line + exit 2
        message = one_line(e)
        for given, rewritten in zip(typed, argv):  # name overrides as they were typed
            message = message.replace(rewritten, given)
        if "input '" in message and any(_BRACES.search(o) for o in args.overrides):
            message += " (a brace pattern inside an override needs quotes: key='/data/{000..099}.tar')"
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
    return argv


_BRACES = re.compile(r"=[^'\"]*\{[^{}:,]*\.\.[^{}]*\}")  # an unquoted {a..b} in a value
