"""What every ame-merge entry path shares (one process, torchrun ranks, strategies): the exit
codes, the one-line error, and a config file + flags turned into a checked MergePlan.

A module of its own so that ``cli`` and ``distributed`` both import it and neither imports
the other."""

from __future__ import annotations

import argparse
import sys

from .errors import MergeError
from .spec import UsageError, check_call, float_arg, load_spec

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: flags that override a config key, and how an error names them
FLAGS = {"backend": "--backend", "threads": "--threads", "out_dtype": "--out-dtype"}


#: the longest error line printed; a longer one (a value quoted from a hostile file) is cut in the middle
MAX_ERROR_CHARS = 1000


def error(msg: str) -> None:
    if len(msg) > MAX_ERROR_CHARS:
        cut = len(msg) - MAX_ERROR_CHARS + 200
        msg = f"{msg[: MAX_ERROR_CHARS - 400]} ...[{cut} characters cut]... {msg[-200:]}"
    print(f"ame-merge: error: {msg}", file=sys.stderr)


def _mergekit_flags(args: argparse.Namespace, spec) -> None:
    """mergekit-yaml's flags: --cuda and -j mapped; the rest accepted with a one-line note."""
    if getattr(args, "cuda", False):
        if args.device is not None and args.device != "cuda":
            raise UsageError(f"--cuda and --device {args.device} disagree")
        args.device = "cuda"
    if getattr(args, "num_threads", None) is not None:
        if args.threads is not None:
            raise UsageError("give --threads or -j/--num-threads, not both")
        args.threads = args.num_threads
    for flag in getattr(args, "mk_noop", None) or []:
        if not getattr(args, "quiet", False):
            print(f"ame-merge: note: {flag} has no effect here (mergekit-yaml's flag; this engine streams in "
                  "bounded memory and copies config and tokenizer files)", file=sys.stderr)


def mergekit_size(value, what: str, strict: bool = True):
    """mergekit's size suffixes (mergekit-yaml --out-shard-size): K, M, B (and G) are powers of 1000,
    so '5B' is 5e9 bytes; a plain number is bytes. With ``strict`` False anything else (5GB, 2GiB)
    is returned unchanged for parse_size."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KkMmBbGg])?\s*", str(value))
    if not m:
        if strict:
            raise UsageError(f"{what}: cannot read {value!r} as a size (mergekit's form: 500M, 5B; K/M/B = 1e3/1e6/1e9)")
        return value
    mult = {None: 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}[m.group(2).upper() if m.group(2) else None]
    return int(float(m.group(1)) * mult)


def prepare(args: argparse.Namespace):
    """Config file + flags -> a checked MergePlan (UsageError/MergeError before any work)."""
    from .engine import DEFAULT_CHUNK_MB, DEFAULT_SHARD_SIZE, parse_size, plan_merge

    spec = load_spec(args.config)
    _mergekit_flags(args, spec)
    overrides = {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
    if getattr(args, "random_seed", None) is not None and spec.method in ("dare_ties", "dare_linear", "della",
                                                                          "della_linear", "ame"):
        try:
            overrides["seed"] = int(args.random_seed)
        except ValueError:
            raise UsageError(f"--random-seed: expected an integer, got {args.random_seed!r}") from None
    try:
        check_call(spec, overrides)
    except MergeError as e:
        msg = str(e)
        for k, flag in FLAGS.items():
            if k in overrides:
                msg = msg.replace(f"AMEConfig.{k}", flag)
        raise UsageError(msg) from None
    chunk_mb = float_arg(args.chunk_mb, "--chunk-mb") if args.chunk_mb is not None else spec.engine.get("chunk_mb", DEFAULT_CHUNK_MB)
    if not (chunk_mb > 0 and chunk_mb != float("inf")):
        raise UsageError(f"--chunk-mb: must be a number > 0, got {args.chunk_mb!r}")
    if getattr(args, "out_shard_size", None) is not None and args.shard_size is None:
        args.shard_size = mergekit_size(args.out_shard_size, "--out-shard-size")
    if args.shard_size is not None:
        if spec.schema == "mergekit":  # mergekit's reading: 5B = 5e9 (K/M/B/G powers of 1000)
            args.shard_size = mergekit_size(args.shard_size, "--shard-size", strict=False)
        try:
            shard_size = parse_size(args.shard_size, "--shard-size")
        except MergeError as e:
            raise UsageError(str(e)) from None
    else:
        shard_size = spec.engine.get("shard_size", DEFAULT_SHARD_SIZE)
    device = str(args.device if args.device is not None else spec.engine.get("device", "cpu"))
    try:
        plan = plan_merge(spec.checkpoints() if hasattr(spec, "checkpoints") else spec.models, None,
                          pivot_path=spec.pivot_path, chunk_mb=chunk_mb, shard_size=shard_size,
                          device=device, method=spec.method, base=spec.base, per_model=spec.per_model,
                          **{**spec.options, **overrides})
    except MergeError as e:  # a per-tensor parameter check (mergekit's gradients and filters): name the file
        if spec.schema == "mergekit" and str(e).startswith("merge: "):
            raise UsageError(f"{spec.source}: {str(e)[len('merge: '):]}") from None
        raise
    plan.schema = spec.schema
    if getattr(args, "copy_tokenizer", None) is False:
        if spec.tokenizer_from or getattr(spec, "chat_template", None):
            raise UsageError(f"--no-copy-tokenizer: {spec.source} names a tokenizer_source or chat_template")
        plan.copy_tokenizer = False
    plan.notes = list(spec.notes)
    if spec.schema == "mergekit":  # what mergekit writes besides the weights: the config as run
        plan.tokenizer_from = spec.tokenizer_from
        plan.config_updates = dict(getattr(spec, "config_updates", {}) or {})
        with open(args.config, encoding="utf-8") as f:
            plan.extra_files["mergekit_config.yml"] = f.read()
        template = getattr(spec, "chat_template", None)
        if template == "auto":
            from .mergekit_schema import auto_chat_template

            cks = plan.ingredients + ([plan.base] if plan.base is not None else [])
            template = auto_chat_template([ck.folder for ck in cks if ck.folder])
        if template:  # written beside the tokenizer (newer transformers read chat_template.jinja, older the key)
            plan.extra_files["chat_template.jinja"] = template
            plan.config_updates["tokenizer_config.json"] = {"chat_template": template}
        if getattr(args, "model_card", None) is not False:  # mergekit writes one by default
            plan.extra_files["README.md"] = model_card(spec, plan.extra_files["mergekit_config.yml"])
    elif getattr(args, "model_card", None):
        with open(args.config, encoding="utf-8") as f:
            plan.extra_files["README.md"] = model_card(spec, f.read())
    return plan


def model_card(spec, config_text: str) -> str:
    """README.md as mergekit writes it: front matter (base_model, tags), the method, the models, the config."""
    models = [str(m) for m in spec.models]
    base = spec.base if isinstance(spec.base, str) else getattr(spec.base, "path", None)
    listed = ([base] if base else []) + [m for m in models if m != base]
    front = "---\nbase_model:\n" + "".join(f"- {m}\n" for m in listed) + \
        "library_name: transformers\ntags:\n- mergekit\n- merge\n- ame-kernels\n---\n"
    body = [
        "# merged model", "",
        "A merge of pre-trained language models made with ame-kernels' `ame-merge` from a "
        "[mergekit](https://github.com/arcee-ai/mergekit) config.", "",
        "## Merge details", "", "### Merge method", "",
        f"`{getattr(spec, 'source_method', spec.method)}`" + (f", with {base} as the base." if base else "."), "",
        "### Models merged", "", *[f"* {m}" for m in models if m != base], "",
        "### Configuration", "", "The YAML configuration used to produce this model:", "",
        "```yaml", config_text.rstrip("\n"), "```", "",
    ]
    return front + "\n".join(body)
