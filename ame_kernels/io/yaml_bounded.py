"""A YAML loader whose documents are bounded before anything is built or printed from them.

A few hundred bytes of YAML can describe a value of billions of nodes: anchors and
aliases (``&a0 [x, x], &a1 [*a0, *a0], ...``, or ``<<: [*a, *a]`` merge keys) are
shared while composing, but anything that walks or prints the value (a ``repr`` in an
error message, ``yaml.safe_dump`` into the provenance file) expands them. This loader
composes the node graph (cheap: aliases are shared there), then measures it with the
aliases expanded, memoised per node so the count itself is linear, and refuses a
document beyond the limits with an error naming the file and the line of the anchor
at fault. It also refuses nesting deeper than ``MAX_DEPTH`` (Python's recursion limit
would end the composer or anything after it in a RecursionError), a recursive alias
(an anchor used inside itself: an infinite value), integers longer than
``MAX_SCALAR`` characters and files over ``MAX_FILE_BYTES``.

Every limit is far above what a merge config needs (a config naming 10,000 models with
scores is about 40,000 nodes); the node count also bounds the time and memory of parsing
(PyYAML's pure-Python composer needs about 35 us and 1 KB a node).
"""

from __future__ import annotations

from typing import Any, Dict

#: file size, in bytes
MAX_FILE_BYTES = 2**20
#: nodes of the document, as written (counted while composing: PyYAML takes ~35 us and ~1 KB a node)
#: and with every alias expanded
MAX_NODES = 50_000
#: characters of all scalars with every alias expanded (bounds any repr of any value)
MAX_CHARS = 8 * 2**20
#: nesting of sequences and mappings
MAX_DEPTH = 64
#: characters of one scalar
MAX_SCALAR = 64 * 2**10


class YAMLLimitError(Exception):
    """A document beyond the loader's limits (the message says which and where)."""


_LOADER = None


def bounded_loader():
    """yaml.SafeLoader with the limits above (composed graph checked before construction)."""
    global _LOADER
    if _LOADER is not None:
        return _LOADER
    import yaml
    from yaml.nodes import MappingNode, ScalarNode, SequenceNode

    class BoundedLoader(yaml.SafeLoader):
        _depth = 0
        _nodes = 0

        def compose_node(self, parent, index):
            self._depth += 1
            self._nodes += 1
            try:
                if self._depth > MAX_DEPTH:
                    mark = self.peek_event().start_mark
                    raise YAMLLimitError(f"nested more than {MAX_DEPTH} levels deep at line {mark.line + 1}")
                if self._nodes > MAX_NODES:
                    mark = self.peek_event().start_mark
                    raise YAMLLimitError(f"more than {MAX_NODES} values (the limit is reached at line {mark.line + 1})")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def get_single_node(self):
            node = super().get_single_node()
            if node is not None:
                _measure(node, ScalarNode, SequenceNode, MappingNode)
            return node

        def construct_yaml_int(self, node):
            if len(node.value) > 64:  # also below int()'s 4300-digit limit, which raises a bare ValueError
                raise YAMLLimitError(
                    f"an integer of {len(node.value)} characters at line {node.start_mark.line + 1} (at most 64)"
                )
            return super().construct_yaml_int(node)

    BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)
    _LOADER = BoundedLoader
    return _LOADER


def _measure(root, ScalarNode, SequenceNode, MappingNode) -> None:
    """(nodes, chars) of ``root`` with aliases expanded; YAMLLimitError beyond the limits or on a cycle.

    Iterative (no recursion limit), memoised by node identity (a shared node is measured once)."""
    done: Dict[int, tuple] = {}
    active = set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in done:
            continue
        if isinstance(node, ScalarNode):
            if len(node.value) > MAX_SCALAR:
                raise YAMLLimitError(
                    f"a value of {len(node.value)} characters at line {node.start_mark.line + 1} (at most {MAX_SCALAR})"
                )
            done[key] = (1, len(node.value))
            continue
        if isinstance(node, SequenceNode):
            kids = list(node.value)
        elif isinstance(node, MappingNode):
            kids = [n for pair in node.value for n in pair]
        else:  # unknown node kind: count it, do not descend
            done[key] = (1, 0)
            continue
        if not children_done:
            if key in active:
                raise YAMLLimitError(f"a recursive alias (an anchor used inside itself) at line {node.start_mark.line + 1}")
            active.add(key)
            stack.append((node, True))
            for k in kids:
                if id(k) in active:
                    raise YAMLLimitError(
                        f"a recursive alias (an anchor used inside itself) at line {node.start_mark.line + 1}"
                    )
                if id(k) not in done:
                    stack.append((k, False))
            continue
        active.discard(key)
        nodes, chars = 1, 0
        for k in kids:
            n, c = done[id(k)]
            nodes += n
            chars += c
        if nodes > MAX_NODES or chars > MAX_CHARS:
            what = f"{nodes} nodes" if nodes > MAX_NODES else f"{chars} characters"
            raise YAMLLimitError(
                f"the value at line {node.start_mark.line + 1} expands to {what} with its aliases expanded "
                f"(at most {MAX_NODES} nodes and {MAX_CHARS} characters: an alias bomb?)"
            )
        done[key] = (nodes, chars)


def load_bounded(text: str, loader=None) -> Any:
    """The YAML document in ``text`` (a str), loaded with ``loader`` (a subclass of ``bounded_loader()``)."""
    import yaml

    return yaml.load(text, Loader=loader or bounded_loader())
