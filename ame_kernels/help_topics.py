"""``ame-merge help [TOPIC]``: the reference an installed package carries (no docs/ folder needed).

Each topic is plain text; ``config`` lists every AMEConfig field with its default, read from the
dataclass, so a new field shows up here without an edit. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from typing import Callable, Dict, Optional, Sequence

#: where the full docs live for a reader with the source tree (named, never needed)
SOURCE_DOCS = "docs/cli.md in the source repository"


def _defaults() -> str:
    from .config import AMEConfig

    rows = []
    for f in dataclasses.fields(AMEConfig):
        if f.default is not dataclasses.MISSING:
            d = f.default
        elif f.default_factory is not dataclasses.MISSING:  # pragma: no cover (no such field today)
            d = f.default_factory()
        else:  # pragma: no cover
            d = "(required)"
        if isinstance(d, tuple):
            d = list(d)
        rows.append(f"  {f.name:<26} {'null' if d is None else d!s}")
    return "\n".join(rows)


def _config() -> str:
    return f"""\
ame-merge CONFIG.yaml OUT_DIR: the config file (YAML)

models:                       # required: a list, in merge order
  - path: ./ckpt/run-a        # a model folder or a file; relative paths are resolved against
    score: 0.712              #   the config file's folder first, then the current directory
  - path: ./ckpt/run-b        # score: optional, but then on every model; sorts the order
    score: 0.698              #   (descending unless descending: false)
  - ./ckpt/run-c.safetensors  # a bare path works too
pivot: soup                   # AME's pivot: soup (default) | a model index | a path to another
                              #   checkpoint (read like a model, not merged in)
optimizer: adam               # an AME option selects method ame; any AMEConfig field (below); read
lr: 1e-3                      #   as people type them (1e-3, "1e-3", true/yes/on, lists for betas)
epochs: 2
# engine options (the command-line flags override them):
chunk_mb: 64                  # MiB of fp32 elements per model per chunk
shard_size: 5GB               # 5GB, 500MB, 2GiB, or bytes
device: cpu                   # cpu | cuda | cuda:N

A model is a Hugging Face folder (model.safetensors, sharded safetensors with
model.safetensors.index.json, or pytorch_model.bin), a .safetensors file, or a .bin/.pt
file (read with weights_only=True).

AMEConfig fields and their defaults (null: chosen per optimizer; lr: sgd 1, adagrad 1e-2,
adam/adamw 1e-3, adadelta 1; eps: torch's defaults):
{_defaults()}

optimizer: sgd | adagrad | adam | adamw | adadelta.  lr_schedule: harmonic (lr/t, the
paper's) | constant | power (lr * t^lr_power).  out_dtype: float32 | bfloat16 | float16
(null: each tensor's dtype in the pivot).  backend: auto | cpu | reference | triton | cuda.

An unknown key or a bad value is an error naming the key and the closest valid one.
The output folder holds the merged shards, config.json and tokenizer files copied from the
pivot or first model, and ame_merge.yaml (how it was made).

Other merge methods (ties, slerp, ...): ame-merge help methods.
Other topics: ame-merge help methods | strategies | inspect | exit-codes | install"""


def _methods() -> str:
    """Every merge method, read from the registry (a new method shows up without an edit)."""
    from .methods import METHODS

    lines = ["ame-merge CONFIG.yaml OUT_DIR with 'method: NAME' (ak.merge(..., method=NAME) takes the same keys)", "",
             "method: ties                  # absent: ame when an AME option is given, else linear (the soup)",
             "base: ./ckpt/base             # for the methods that need one",
             "models:",
             "  - {path: ./ckpt/a, weight: 1.0, density: 0.3}   # per-model parameters beside path",
             "lambda: 1.0                   # global parameters at the top level", ""]
    for name, m in METHODS.items():
        base = {"required": "needs base:", "never": "no base"}[m.base]
        count = f"{m.min_n}" + ("" if m.max_n == m.min_n else ("+" if m.max_n is None else f"..{m.max_n}"))
        lines.append(f"{name} ({m.title}; {base}; {count} models): {m.formula}")
        if name == "ame":
            lines.append("    every AMEConfig field (ame-merge help config); transform: ties | dare | breadcrumbs "
                         "with base: sparsifies the task vectors first")
        for q in m.params:
            lines.append(f"    {q.describe()}")
        lines.append(f"    {m.paper}")
    return "\n".join(lines)


def _strategies() -> str:
    return """\
ame-merge CONFIG.yaml OUT_DIR with a 'strategy:' key: stateful strategies (whole models in memory)

strategy: ame                 # default: the streaming merge (ame-merge help config / methods)
strategy: greedy              # greedy AME (paper, Appendix A.4): evaluate:, start: worst|best
strategy: stew                # online AME over the schedule's batches: mode: server|merge
strategy: greedy_soup         # the model-soups recipe: evaluate:
strategy: uniform_soup        # the mean: method linear, streamed on the engine
strategy: weighted_soup       # weights: [a_1, ..., a_N], normalize: true|false (method linear;
                              #   with base: and normalize: false, task_arithmetic)
evaluate: my_pkg.evals:val_accuracy   # 'module:function' or 'path/to/file.py:function'

evaluate gets a candidate as a state dict (name -> tensor) and returns a number, higher is
better. Per-model score: entries order the greedy strategies; without them evaluate scores
every model first."""


def _inspect() -> str:
    return """\
ame-merge inspect MODEL MODEL ... [--base BASE] [--json] [--top K] [--chunk-mb M]
ame-merge inspect CONFIG.yaml [--base BASE] ...     (its models: and base:)

How alike the models are (no merge is run): each model's norm and distance to the uniform
soup, the pairwise cosine similarity and L2 distance of the whole models, the soup's norm
relative to the mean norm (1 when the models agree), and the least similar tensors (tensors
that are zero in some model have no cosine and are listed apart). With --base the task
vectors x_i - base are compared instead of the weights. --json prints everything, per tensor.

The threshold checks at the end are heuristics from the literature, not a prediction: no
measurement in this project calibrates them (the demo's ingredients, fine-tunes of one init,
cross two of them, and their soup beats the best ingredient by 19 points on test). The soup's
own validation score is the test."""


def _exit_codes() -> str:
    return """\
ame-merge exit codes

  0        merged (or --dry-run checked)
  2        bad usage, config or input (a missing or truncated file, names or shapes that
           differ, an existing OUT_DIR): found before any work; nothing written
  1        a failure during the merge (NaN/Inf in a tensor, a disk error): nothing left behind
  130/143  interrupted by Ctrl-C / SIGTERM: nothing left behind

Errors are one line on stderr, 'ame-merge: error: ...' (--verbose adds the traceback)."""


def _install() -> str:
    return """\
Installing ame-kernels (from a clone: '.' for 'ame-kernels')

  pip install torch                   # first: the torch build this machine needs
  pip install ame-kernels             # the package and its C++ CPU kernels (needs a C++17 compiler)
  pip install 'ame-kernels[demo]'     # + scikit-learn, for python -m ame_kernels.demo
  pip install 'ame-kernels[triton]'   # + the Triton GPU kernels

The CUDA C++ module is built only where it can run: the installed torch is a CUDA build or
an NVIDIA driver is visible, and nvcc is found. It adds about 3 minutes to the install on
2 cores. Torch installed by the same pip command arrives after the build: install it first.
Environment switches: AME_BUILD_CUDA=1 (always; an error without nvcc) or 0 (never),
AME_SKIP_NATIVE=1 (pure Python: the reference and Triton backends only),
AME_CUDA_ARCHS="80;90", AME_BUILD_JOBS=N. ame-merge --version says what was built."""


def _mergekit() -> str:
    return """\
mergekit configs (a YAML file with 'merge_method:' is read with mergekit's schema, unchanged)

  merge_method: ties            # linear task_arithmetic ties dare_ties dare_linear breadcrumbs
  base_model: org/base          #   breadcrumbs_ties della della_linear slerp model_stock
  models:                       #   passthrough (slices) ame (AME: parameters optimizer, lr, ...)
    - model: path/or/org-name@revision
      parameters:
        weight: 0.5                          # required for linear and the task-vector methods
        density: [0.2, 0.5, 0.8]             # a gradient over the layers
        gamma: [{filter: mlp, value: 0.02}, {value: 0.01}]   # filter rules, then a default
  parameters: {lambda: 1.0, normalize: true, int8_mask: true}
  dtype: bfloat16               # the output dtype unless out_dtype (compute is float32 here)
  tokenizer_source: base        # or a model path: its tokenizer files are copied
  random_seed: 0                # dare_* / della* masks

  slices:                       # instead of models: stack layer ranges (a frankenmerge)
    - sources: [{model: a/, layer_range: [0, 24]}]
    - sources: [{model: b/, layer_range: [8, 32]}]

Parameters as mergekit evaluates them: a list is interpolated over the layer index (layer i
of L at i/(L-1); embeddings, final norm and lm_head at 0); {filter, value} rules match a
substring of the tensor name, in order; a model's own parameters come before the top-level
ones (shared ones: lambda, normalize, rescale, t, filter_wise, top level only). The base
model is excluded from the task vectors; for slerp it is the t = 0 end. int8_mask has no
effect on the result (mergekit only stores its masks as int8). --dry-run prints
'schema: mergekit'. The output also holds mergekit_config.yml (the config as run).

Hugging Face IDs resolve through the local cache (HF_HUB_CACHE, else $HF_HOME/hub,
else ~/.cache/huggingface/hub; org/name@rev reads refs/rev); one not there is downloaded
into it (huggingface_hub, the extra ame-kernels[hub]) unless HF_HUB_OFFLINE=1, else an error
saying how to get it. 'model: BASE+ADAPTER' applies a PEFT LoRA adapter folder to its
base tensor by tensor (W + alpha/r B@A, as PEFT's merge_and_unload; modules_to_save
honoured). A model with a tied lm_head (none in its files, tie_word_embeddings: true)
merges with untied ones through its embeddings, as mergekit. Not supported (an error naming
it): modules:, tokenizer_source: union, tokenizer.tokens, mergekit's named chat templates
(chat_template takes the Jinja text or 'auto'), DoRA adapters,
mergekit's other methods. Besides the weights the output holds mergekit_config.yml and a
README.md model card (--no-write-model-card: none).

Sizes: with a mergekit config, --shard-size and --out-shard-size read mergekit's suffixes,
K/M/B (and G) as powers of 1000: 5B is 5e9 bytes (with the ame schema 5B is 5 bytes; 5GB
is 5e9 in both). mergekit-yaml's other flags: --cuda (= --device cuda), -j/--num-threads
(= --threads), --random-seed (= random_seed), --no-copy-tokenizer (no tokenizer files), --no-write-model-card (no README.md);
--allow-crimes, --lazy-unpickle, --low-cpu-memory, --read-to-gpu, --multi-gpu and
--trust-remote-code are accepted with a one-line note.

A 'mergekit-yaml CONFIG OUT [flags]' command is installed: this engine under mergekit's name.
Where mergekit is installed too, the package installed last owns bin/mergekit-yaml; ours hands
a run it refuses but mergekit supports (union tokenizers, modules:, DoRA, other methods, a
mergekit-only flag) to mergekit's own entry, with the same argv, when mergekit is importable
and AME_NO_MERGEKIT_FALLBACK=1 is not set; never a config mergekit refuses too."""


TOPICS: Dict[str, Callable[[], str]] = {
    "config": _config,
    "methods": _methods,
    "strategies": _strategies,
    "inspect": _inspect,
    "exit-codes": _exit_codes,
    "install": _install,
    "mergekit": _mergekit,
}

SUMMARY = {
    "config": "the YAML config file: keys, every AMEConfig field and its default",
    "methods": "method: linear | task_arithmetic | ties | dare_* | breadcrumbs* | della* | slerp | model_stock | ame",
    "strategies": "strategy: greedy | stew | greedy_soup | uniform_soup | weighted_soup",
    "inspect": "ame-merge inspect: how alike the models are (cosine, L2, norms)",
    "exit-codes": "what each exit code means",
    "install": "pip extras and build switches",
    "mergekit": "mergekit's YAML configs (merge_method:, slices:, gradients, filters) run unchanged",
}


def topic_text(name: Optional[str]) -> str:
    """The text of a topic, or the list of topics for None; KeyError for an unknown one."""
    if name is None:
        width = max(map(len, TOPICS))
        return "ame-merge help TOPIC, one of:\n" + "\n".join(f"  {k:<{width}}  {SUMMARY[k]}" for k in TOPICS) + (
            "\nand ame-merge --help for the command line.")
    return TOPICS[name]()


def help_main(argv: Sequence[str]) -> int:
    """``ame-merge help [TOPIC]``: 0, or 2 for an unknown topic (with the closest one)."""
    argv = list(argv)
    if len(argv) > 1:
        print(f"ame-merge help: error: one topic at a time, got {' '.join(argv)}", file=sys.stderr)
        return 2
    name = argv[0] if argv else None
    if name in ("-h", "--help"):
        name = None
    if name is not None and name not in TOPICS:
        close = difflib.get_close_matches(name, list(TOPICS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"ame-merge help: error: unknown topic {name!r}{hint}; topics: {', '.join(TOPICS)}", file=sys.stderr)
        return 2
    print(topic_text(name))
    return 0
